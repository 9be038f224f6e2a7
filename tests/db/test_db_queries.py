"""db/queries.py and db/writes.py on a small synthetic database (bench/synth_db.py)."""

from __future__ import annotations

import numpy as np
import pytest

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.schema import DatabaseError
from featuredict.db.store import Store
from tests.helpers import HOSTILE_FEATURE, HOSTILE_SCRIPT, SAE_ID, make_synth_db, read_only, run_threads


def own_word(store: Store, feature: int) -> str:
    """A word from the feature's top context that is rare in the corpus (its own pseudo-word)."""
    toks = store.rows("SELECT max_tokens FROM features WHERE sae_id = ? AND feature = ?", [SAE_ID, feature])[0][0]
    counts = {}
    for t in toks:
        n = store.rows("SELECT count(*) FROM features WHERE contains(search_text, ?)", [t.strip()])[0][0]
        counts[t.strip()] = n
    return min(counts, key=counts.get)


def test_sae_overview_and_histogram(store):
    df = q.sae_overview(store)
    assert df["sae_id"].tolist() == [SAE_ID] == q.sae_ids(store)
    store.write(lambda c: c.execute("INSERT INTO saes SELECT * REPLACE ('a first' AS sae_id) FROM saes"))
    assert q.sae_ids(store) == ["a first", SAE_ID]  # sorted: the picker's order
    assert int(df["n_features"].iloc[0]) == 300
    assert int(q.sae_overview(store)["n_features"].iloc[0]) == 0  # "a first" has no features
    hist, dead = q.density_histogram(store, SAE_ID)
    live = store.rows("SELECT count(*) FROM features WHERE density > 0")[0][0]
    assert int(hist["count"].sum()) == live and dead == 300 - live
    assert (hist["log10_hi"] > hist["log10_lo"]).all()


def test_feature_examples_neighbours(store):
    f = q.feature(store, SAE_ID, 5)
    assert f["feature"] == 5 and f["max_act"] > 0 and len(f["hist_counts"]) == 24
    assert q.feature(store, SAE_ID, 10_000) is None
    top = q.examples(store, SAE_ID, 5, "top")
    assert len(top) == 20 and top["rank"].tolist() == list(range(20))
    assert top["max_act"].is_monotonic_decreasing
    assert len(top["tokens"].iloc[0]) == len(top["acts"].iloc[0]) == 64
    inter = q.examples(store, SAE_ID, 5, "interval")
    assert len(inter) == 12 and inter["band"].is_monotonic_decreasing
    assert ((inter["max_act"] >= inter["band_lo"] - 1e-5) & (inter["max_act"] < inter["band_hi"])).all()
    nb = q.neighbours(store, SAE_ID, 5)
    assert nb["feature"].tolist() == list(f["neighbours"]) and nb["cos"].is_monotonic_decreasing


def test_search_finds_feature_by_context_word(store):
    word = own_word(store, 7)
    res = q.search(store, SAE_ID, word)
    assert 7 in res["feature"].tolist()
    assert "context" in res.loc[res["feature"] == 7, "matched"].iloc[0]
    # every term must match: adding a nonsense term empties the result
    assert q.search(store, SAE_ID, f"{word} qqqzzzxx").empty


def test_search_ranks_label_over_context(store):
    word = own_word(store, 11)
    writes.update_label(store, SAE_ID, 12, label=f"the {word} feature")
    res = q.search(store, SAE_ID, word)
    assert res["feature"].iloc[0] == 12 and "label" in res["matched"].iloc[0]


def test_search_by_id_filters_and_tags(store):
    assert q.search(store, SAE_ID, "#42")["feature"].iloc[0] == 42
    assert q.search(store, SAE_ID, "feature 43")["feature"].iloc[0] == 43
    writes.update_label(store, SAE_ID, 3, add_tags=["bio"])
    writes.update_label(store, SAE_ID, 4, add_tags=["bio", "safety"])
    tagged = q.search(store, SAE_ID, "", q.SearchFilters(tag="safety"), limit=500)
    assert 4 in tagged["feature"].tolist() and 3 not in tagged["feature"].tolist()
    assert all("safety" in list(t) for t in tagged["tags"])
    hi = q.search(store, SAE_ID, "", q.SearchFilters(min_max_act=5.0), limit=1000)
    assert (hi["max_act"] >= 5.0).all() and len(hi) > 0
    dens = q.search(store, SAE_ID, "", q.SearchFilters(min_log10_density=-4, max_log10_density=-3), limit=1000)
    assert ((dens["density"] >= 1e-4) & (dens["density"] <= 1e-3)).all() and len(dens) > 0
    lab = q.search(store, SAE_ID, "", q.SearchFilters(labelled="labelled"), limit=1000)
    unl = q.search(store, SAE_ID, "", q.SearchFilters(labelled="unlabelled"), limit=1000)
    n_live = store.rows("SELECT count(*) FROM features WHERE NOT dead")[0][0]
    assert len(lab) + len(unl) == n_live and lab["label"].notna().sum() + lab["tags"].notna().sum() > 0


def test_search_sql_injection_is_inert(store):
    n = store.rows("SELECT count(*) FROM features")[0][0]
    for bad in ["'; DROP TABLE features; --", '"; DROP TABLE features; --', "%' OR 1=1 --", "_", "%"]:
        res = q.search(store, SAE_ID, bad)
        assert len(res) <= 50
    assert store.rows("SELECT count(*) FROM features")[0][0] == n
    # LIKE wildcards are literal: '%' matches only text that contains a '%'
    assert q.search(store, SAE_ID, "%").empty


def test_search_hostile_text_is_data(store):
    res = q.search(store, SAE_ID, "<script>")
    assert res["feature"].iloc[0] == HOSTILE_FEATURE
    assert HOSTILE_SCRIPT in res["snippet"].iloc[0]  # raw here; pages escape it


def test_parse_terms():
    assert q.parse_terms('Bread  "red oven" BREAD') == ["bread", "red oven"]
    assert q.parse_terms("") == []
    assert q.feature_id_in_query(" #12 ") == 12 and q.feature_id_in_query("12a") is None


def test_map_points_and_baselines(store):
    pts = q.map_points(store, SAE_ID)
    assert len(pts) == 300 and str(pts["x"].dtype) == "float32"
    assert (pts.loc[pts["log10_density"] > -9, "log10_density"] < 0).all()
    base = q.feature_baselines(store, SAE_ID, 300)
    f = q.feature(store, SAE_ID, 9)
    assert base.density[9] == pytest.approx(f["density"]) and base.max_act[9] == pytest.approx(f["max_act"])


def test_update_label_merges_fields_and_tags(store):
    writes.update_label(store, SAE_ID, 20, label="first", add_tags=["a", "b"], author="ann")
    writes.update_label(store, SAE_ID, 20, notes="a note")  # label untouched
    row = writes.update_label(store, SAE_ID, 20, add_tags=["c"], remove_tags=["a"])
    assert row["label"] == "first" and row["notes"] == "a note" and list(row["tags"]) == ["b", "c"]
    assert row["author"] == "ann"
    writes.update_label(store, SAE_ID, 20, label="  ")  # blank clears
    assert q.label(store, SAE_ID, 20)["label"] is None
    labelled = store.rows("SELECT count(*) FROM labels WHERE sae_id = ?", [SAE_ID])[0][0]
    writes.update_label(store, SAE_ID, 20, notes="", remove_tags=["b", "c"])  # clear everything
    assert q.label(store, SAE_ID, 20) is None  # unlabelled again, not an empty row
    assert store.rows("SELECT count(*) FROM labels WHERE sae_id = ?", [SAE_ID])[0][0] == labelled - 1


def test_save_label_edit_keeps_concurrent_changes(store):
    before = q.label(store, SAE_ID, 21)  # None: nothing yet
    writes.update_label(store, SAE_ID, 21, add_tags=["theirs"], notes="their note")  # someone else, meanwhile
    writes.save_label_edit(store, SAE_ID, 21, before, label="mine", tags=["mine-tag"], notes="")
    row = q.label(store, SAE_ID, 21)
    assert row["label"] == "mine" and set(row["tags"]) == {"theirs", "mine-tag"}
    assert row["notes"] == "their note"  # we did not change notes (blank before, blank after)


def test_lists_roundtrip(store):
    assert writes.add_to_list(store, "deception", SAE_ID, [1, 2, 3]) == 3
    assert writes.add_to_list(store, "deception", SAE_ID, [3, 4], note="x") == 1
    names = q.list_names(store)
    assert names["list_name"].tolist() == ["deception", f"list {HOSTILE_SCRIPT}"]
    mem = q.list_members(store, "deception")
    assert mem["feature"].tolist() == [1, 2, 3, 4]
    assert mem.loc[mem["feature"] == 3, "note"].iloc[0] == "x"
    writes.remove_from_list(store, "deception", SAE_ID, 2)
    writes.rename_list(store, "deception", "lies")
    assert q.list_members(store, "lies")["feature"].tolist() == [1, 3, 4]
    assert q.lists_of_feature(store, SAE_ID, 3) == ["lies"]
    assert writes.delete_list(store, "lies") == 3 and q.list_members(store, "lies").empty
    with pytest.raises(ValueError):
        writes.add_to_list(store, "   ", SAE_ID, 1)


def test_list_adds_check_ids_and_accept_numpy_ints(store):
    import numpy as np

    assert writes.add_to_list(store, "np", SAE_ID, np.int64(3)) == 1
    assert writes.add_to_list(store, "np", SAE_ID, np.array([4, 5])) == 2
    for bad in ([-5], [1_000_000], [10**11]):
        with pytest.raises(ValueError, match="no feature|between 0 and"):
            writes.add_to_list(store, "np", SAE_ID, bad)
    assert q.list_members(store, "np")["feature"].tolist() == [3, 4, 5]  # nothing half-added


def test_concurrent_writes_lose_nothing(store):
    """8 threads x 25 writes each: tag additions to one shared feature, list adds, and label upserts."""
    n_threads, n_each = 8, 25
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(n_each):
                writes.update_label(store, SAE_ID, 30, add_tags=[f"t{t}-{i}"])
                writes.add_to_list(store, "hammer", SAE_ID, t * n_each + i)  # 200 distinct ids of 300
                writes.update_label(store, SAE_ID, 100 + t, label=f"label {t}-{i}", author=f"w{t}")
                assert q.label(store, SAE_ID, 30) is not None  # reads interleave with writes
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    run_threads(worker, n_threads)
    assert not errors, errors
    tags = q.label(store, SAE_ID, 30)["tags"]
    assert len(tags) == n_threads * n_each == len(set(tags))
    assert len(q.list_members(store, "hammer")) == n_threads * n_each
    for t in range(n_threads):
        assert q.label(store, SAE_ID, 100 + t)["label"] == f"label {t}-{n_each - 1}"


def test_writes_survive_reopen(synth_db):
    s = Store(synth_db)
    writes.update_label(s, SAE_ID, 50, label="kept", add_tags=["x"])
    writes.add_to_list(s, "keep", SAE_ID, 50)
    s.close()
    with read_only(synth_db) as con:
        assert con.execute("SELECT label FROM labels WHERE feature = 50").fetchone()[0] == "kept"
        assert con.execute("SELECT count(*) FROM lists WHERE list_name = 'keep'").fetchone()[0] == 1


def test_bad_files_raise_database_error(tmp_path):
    with pytest.raises(DatabaseError, match="No database"):
        Store(tmp_path / "missing.duckdb")
    (tmp_path / "empty.duckdb").write_bytes(b"")
    with pytest.raises(DatabaseError, match="empty"):
        Store(tmp_path / "empty.duckdb")


def test_synthetic_generator_shapes(store):
    assert store.rows("SELECT sae_id, corpus FROM saes")[0] == (SAE_ID, "synthetic")
    rows = store.rows("SELECT feature, count(*) FROM examples WHERE kind = 'top' GROUP BY 1")
    assert all(n == 20 for _, n in rows)
    dens = np.array([r[0] for r in store.rows("SELECT density FROM features WHERE density > 0")])
    assert 1e-5 < np.median(dens) < 1e-2


def test_open_store_follows_a_rebuilt_file(synth_db, tmp_path):
    """One Store per path; a new file swapped in the way a build does it (under the exclusive lock) is what the
    same Store reads next."""
    import os

    from featuredict.dashboard.common import open_store
    from featuredict.db.filelock import lock_for

    s1 = open_store(synth_db)
    writes.add_to_list(s1, "x", SAE_ID, 1)
    assert open_store(synth_db) is s1
    assert q.feature_count(s1, SAE_ID) == 300  # its read connection is open on the old file
    gen = s1.generation()
    new = make_synth_db(tmp_path / "rebuilt.duckdb", n_features=40, seed=5)
    with lock_for(synth_db).exclusive():
        os.replace(new, synth_db)
    assert s1.generation() == gen + 1
    assert open_store(synth_db) is s1 and q.feature_count(s1, SAE_ID) == 40
    s1.close()
