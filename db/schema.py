"""The one module that owns featuredict's DuckDB tables.

Layout (schema version ``SCHEMA_VERSION``):

Build tables (rewritten for one SAE by ``featuredict build``; other SAEs in the same file are kept):
- ``saes``       one row per SAE: how to reload model + SAE, where activations were taken, corpus,
                 reconstruction quality, histogram bin edges, build provenance.
- ``features``   one row per (sae_id, feature): statistics, histogram, logit effects, decoder vector,
                 decoder-cosine neighbours, UMAP position, search text.
- ``examples``   activating contexts: kind 'top' (top-k by max activation in the context) and kind
                 'interval' (random samples per activation band), with the feature's activation on every
                 token of the context.

User tables (never deleted or rewritten by a build):
- ``labels``            label / tags / notes / author / time per feature.
- ``lists``             named saved lists of features.
- ``steering_presets``  named steering configurations.
- ``explanations``      words for a feature, many per feature: text, method, explainer model, scores, author,
                        time and the fingerprint of the SAE weights it was made for (stale when they differ).
                        Text comes from an LLM or an import: untrusted, escape it before HTML.
- ``feature_embeddings`` one sentence-embedding vector per (sae_id, feature, embedding model) of the feature's
                        words (explanations, label, tags, notes, a summary of its top contexts), for search
                        by meaning; ``text_hash`` tells when the words changed since.
- ``reviews``           safety review per feature: status (``REVIEW_STATUSES``), reviewer, reason, time and a
                        ``version`` counted up on every change (the form carries it: a stale save is a conflict).
- ``history``           append-only log of every change to labels, tags, notes, review status and list
                        membership: who, when, field, old and new value (JSON text), and whether it was applied
                        (``action`` 'set') or refused as a conflict (``action`` 'conflict').
- ``watch_settings``    per member of a list used as a watchlist: threshold (fraction of the feature's max
                        activation) and severity (``SEVERITIES``); members without a row use the defaults.
- ``sae_evals``         quality figures per (SAE, method): ΔLM loss, loss recovered vs zero-ablation, KL, FVE, L0
                        on the tokens stated (``method`` 'splice': featuredict's splice path, written after each
                        build; 'sae_lens': sae-lens's own evals, for comparison). Kept across rebuilds of other
                        SAEs like a user table; a rebuild of an SAE replaces its 'splice' row.

A read-write open creates user tables that an older file lacks, and adds the columns of ``ADDED_COLUMNS`` an
older file lacks (NULL in its rows), so adding a user table or a nullable column needs no version bump.

All statements here are constants; values always travel as parameters.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from featuredict.db.errors import UserError

SCHEMA_VERSION = 1

BUILD_TABLES = ("saes", "features", "examples")
USER_TABLES = (
    "labels",
    "lists",
    "steering_presets",
    "explanations",
    "feature_embeddings",
    "reviews",
    "history",
    "watch_settings",
    "sae_evals",
)
REVIEW_STATUSES = ("unreviewed", "benign", "concerning", "needs second look")
SEVERITIES = ("low", "medium", "high", "critical")  # watchlist severities, lowest first

DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key   VARCHAR PRIMARY KEY,
        value VARCHAR NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS saes (
        sae_id          VARCHAR PRIMARY KEY,  -- user-facing name, unique in the file
        model_spec      VARCHAR NOT NULL,     -- how to reload the model: preset, HF id or folder
        model_name      VARCHAR,              -- human-readable model name
        model_kwargs    VARCHAR,              -- JSON: model_from_pretrained_kwargs used for activations
        dtype           VARCHAR,              -- dtype the model ran in during the build
        sae_source      VARCHAR NOT NULL,     -- JSON: {"kind": "registry"|"folder", release, sae_id, path}
        hook_name       VARCHAR NOT NULL,     -- where activations were taken
        hook_kind       VARCHAR NOT NULL,     -- 'hf_module' | 'transformer_lens'
        architecture    VARCHAR,
        d_in            INTEGER NOT NULL,
        d_sae           INTEGER NOT NULL,
        context_size    INTEGER NOT NULL,
        prepend_bos     BOOLEAN NOT NULL,
        corpus          VARCHAR,              -- description of the corpus used
        n_tokens        BIGINT NOT NULL,      -- tokens counted in statistics (BOS/pad excluded)
        n_contexts      BIGINT NOT NULL,
        fve             DOUBLE,               -- fraction of variance explained by the reconstruction
        l0              DOUBLE,               -- mean number of active features per token
        dead_fraction   DOUBLE,
        hist_edges      DOUBLE[] NOT NULL,    -- log-spaced bin edges of features.hist_counts
        build_seconds   DOUBLE,
        built_at        TIMESTAMP,
        tool_version    VARCHAR,
        config_json     VARCHAR,              -- the full build config
        stage_seconds   VARCHAR               -- JSON {stage: seconds} in build order (pipelines.stages.STAGES)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS features (
        sae_id               VARCHAR NOT NULL,
        feature              INTEGER NOT NULL,
        max_act              REAL NOT NULL,      -- max activation seen on the corpus
        fire_count           BIGINT NOT NULL,    -- tokens with activation > 0
        density              DOUBLE NOT NULL,    -- fire_count / saes.n_tokens
        mean_act             REAL,               -- mean activation when firing (NULL if dead)
        dead                 BOOLEAN NOT NULL,
        hist_counts          BIGINT[] NOT NULL,  -- firing-token counts per saes.hist_edges bin
        pos_tokens           VARCHAR[],          -- top promoted tokens: W_dec[i] @ W_U, descending
        pos_values           REAL[],
        neg_tokens           VARCHAR[],          -- top suppressed tokens, most negative first
        neg_values           REAL[],
        decoder              FLOAT[] NOT NULL,   -- W_dec[i], length d_in
        decoder_norm         REAL NOT NULL,
        neighbours           INTEGER[],          -- top decoder-cosine neighbours, descending
        neighbour_cos        REAL[],
        umap_x               REAL,
        umap_y               REAL,
        max_tokens           VARCHAR[],          -- token at the max position of each top example
        search_text          VARCHAR,            -- text around max positions of top examples + logit tokens
        PRIMARY KEY (sae_id, feature)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS examples (
        sae_id      VARCHAR NOT NULL,
        feature     INTEGER NOT NULL,
        kind        VARCHAR NOT NULL,   -- 'top' | 'interval'
        band        INTEGER NOT NULL,   -- 0 for top; for interval: band index, higher = stronger
        band_lo     REAL,               -- interval band's activation range [band_lo, band_hi)
        band_hi     REAL,
        rank        INTEGER NOT NULL,   -- order within (kind, band); 0 = first shown
        context_id  BIGINT NOT NULL,    -- index of the context in the build's token stream
        max_act     REAL NOT NULL,      -- the feature's max activation in this context
        max_pos     INTEGER NOT NULL,   -- position of that max in tokens
        token_ids   INTEGER[] NOT NULL,
        tokens      VARCHAR[] NOT NULL, -- decoded token strings, raw corpus text (escape before HTML!)
        acts        FLOAT[] NOT NULL    -- the feature's activation on every token (0 at BOS/pad)
    )
    """,
    "CREATE INDEX IF NOT EXISTS examples_feature_idx ON examples (sae_id, feature)",
    """
    CREATE TABLE IF NOT EXISTS labels (
        sae_id      VARCHAR NOT NULL,
        feature     INTEGER NOT NULL,
        label       VARCHAR,
        tags        VARCHAR[],
        notes       VARCHAR,
        author      VARCHAR,
        updated_at  TIMESTAMP NOT NULL,
        PRIMARY KEY (sae_id, feature)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS lists (
        list_name   VARCHAR NOT NULL,
        sae_id      VARCHAR NOT NULL,
        feature     INTEGER NOT NULL,
        note        VARCHAR,
        added_at    TIMESTAMP NOT NULL,
        PRIMARY KEY (list_name, sae_id, feature)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS steering_presets (
        name        VARCHAR PRIMARY KEY,
        sae_id      VARCHAR NOT NULL,
        config_json VARCHAR NOT NULL,   -- JSON of pipelines.steering config (prompt, features, settings)
        created_at  TIMESTAMP NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS explanations (
        id              BIGINT PRIMARY KEY, -- the writer assigns max(id) + 1 under its lock (kept across rebuilds)
        sae_id          VARCHAR NOT NULL,
        feature         INTEGER NOT NULL,
        text            VARCHAR,            -- NULL when the explainer failed (see error)
        method          VARCHAR NOT NULL,   -- 'tokens' | 'openai' | 'hf' | 'import' | ...
        explainer_model VARCHAR,            -- model or endpoint that wrote it (NULL for 'tokens')
        detection       REAL,               -- balanced accuracy on held-out contexts (NULL until scored)
        fuzzing         REAL,               -- balanced accuracy telling right from wrong token marks
        scorer_model    VARCHAR,
        error           VARCHAR,            -- one line: why this feature has no explanation from this method
        author          VARCHAR,
        source          VARCHAR,            -- provenance of an import (file, Neuronpedia model/layer)
        sae_fingerprint VARCHAR,            -- fingerprint of the SAE weights it was made for
        tokens_used     INTEGER,            -- LLM tokens spent (prompt + completion), when known
        created_at      TIMESTAMP NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS explanations_feature_idx ON explanations (sae_id, feature)",
    """
    CREATE TABLE IF NOT EXISTS feature_embeddings (
        sae_id      VARCHAR NOT NULL,
        feature     INTEGER NOT NULL,
        model       VARCHAR NOT NULL,   -- sentence-embedding model id
        text        VARCHAR NOT NULL,   -- the words that were embedded
        text_hash   VARCHAR NOT NULL,   -- hash of text: a changed label/explanation makes it stale
        vector      FLOAT[] NOT NULL,   -- L2-normalised
        updated_at  TIMESTAMP NOT NULL,
        PRIMARY KEY (sae_id, feature, model)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS reviews (
        sae_id      VARCHAR NOT NULL,
        feature     INTEGER NOT NULL,
        status      VARCHAR NOT NULL,   -- one of REVIEW_STATUSES
        reviewer    VARCHAR,
        reason      VARCHAR,
        version     INTEGER NOT NULL,   -- 1 on the first review, +1 on every change
        updated_at  TIMESTAMP NOT NULL,
        PRIMARY KEY (sae_id, feature)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS history (
        id          BIGINT PRIMARY KEY, -- the writer assigns max(id) + 1 under its lock; rows are never changed
        sae_id      VARCHAR NOT NULL,
        feature     INTEGER NOT NULL,
        field       VARCHAR NOT NULL,   -- 'label' | 'notes' | 'tags' | 'review' | 'list'
        old_value   VARCHAR,            -- JSON text (NULL: none)
        new_value   VARCHAR,            -- JSON text (NULL: none)
        author      VARCHAR,
        action      VARCHAR NOT NULL,   -- 'set' (applied) | 'conflict' (refused: someone saved first)
        changed_at  TIMESTAMP NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS history_feature_idx ON history (sae_id, feature)",
    """
    CREATE TABLE IF NOT EXISTS watch_settings (
        list_name   VARCHAR NOT NULL,   -- a list (table lists) used as a watchlist
        sae_id      VARCHAR NOT NULL,
        feature     INTEGER NOT NULL,
        threshold   REAL NOT NULL,      -- fires when activation >= threshold * the feature's max_act
        severity    VARCHAR NOT NULL,   -- one of SEVERITIES
        updated_at  TIMESTAMP NOT NULL,
        PRIMARY KEY (list_name, sae_id, feature)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS sae_evals (
        sae_id          VARCHAR NOT NULL,
        method          VARCHAR NOT NULL,   -- 'splice' (pipelines/attribution/quality.py) or 'sae_lens'
        n_tokens        BIGINT NOT NULL,    -- positions the figures average over
        n_contexts      INTEGER NOT NULL,
        context_size    INTEGER NOT NULL,
        ce_clean        DOUBLE,             -- next-token cross-entropy of the plain model (nats)
        ce_sae          DOUBLE,             -- ... with decode(encode(x)) in place of x
        ce_zero         DOUBLE,             -- ... with 0 in place of x
        delta_lm_loss   DOUBLE,             -- ce_sae - ce_clean
        loss_recovered  DOUBLE,             -- (ce_zero - ce_sae) / (ce_zero - ce_clean)
        kl              DOUBLE,             -- mean KL(p_clean || p_sae), nats
        fve             DOUBLE,
        l0              DOUBLE,
        created_at      TIMESTAMP NOT NULL,
        PRIMARY KEY (sae_id, method)
    )
    """,
)

_USER_DDL = tuple(s for s in DDL if any(f" {t} (" in s for t in USER_TABLES))

# Nullable columns added to a table after files of this schema version were written: (table, column, type).
# A read-write open adds the ones a file lacks; readers of such a column tolerate it missing (read-only opens
# of old files). Each must also be in the table's DDL above.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (("saes", "stage_seconds", "VARCHAR"),)


def add_missing_columns(con: duckdb.DuckDBPyConnection) -> None:
    """``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` for every entry of ``ADDED_COLUMNS`` (constants only)."""
    for table, column, kind in ADDED_COLUMNS:
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")


class DatabaseError(UserError, RuntimeError):
    """A database that cannot be used, with a message fit to show a user as is."""


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table (idempotent) and stamp the schema version."""
    for stmt in DDL:
        con.execute(stmt)
    con.execute(
        "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [str(SCHEMA_VERSION)],
    )


# Catalog name a rebuild attaches the previous file under. DuckDB names a file's own catalog after its stem
# (``old.duckdb`` is catalog "old"), so a short common word here collides with such a file: use an unlikely one.
_OLD = "featuredict_rebuild_source"


def _catalog(name: str) -> str:
    """``name`` quoted as a DuckDB identifier (catalog names here are constants; quoting keeps them inert)."""
    return '"' + name.replace('"', '""') + '"'


def schema_version(con: duckdb.DuckDBPyConnection, catalog: str | None = None) -> int | None:
    """The file's schema version, or None when it has no featuredict metadata; ``catalog`` reads an attached
    database instead of the connection's own."""
    if catalog is None:
        has_meta = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()
        meta = "meta"
    else:
        has_meta = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_catalog = ? AND table_name = 'meta'",
            [catalog],
        ).fetchone()
        meta = f"{_catalog(catalog)}.meta"
    if not has_meta or has_meta[0] == 0:
        return None
    row = con.execute(f"SELECT value FROM {meta} WHERE key = 'schema_version'").fetchone()  # noqa: S608
    return int(row[0]) if row else None


def check_version(con: duckdb.DuckDBPyConnection, path: str | Path, catalog: str | None = None) -> None:
    """Raise DatabaseError unless the file (attached as ``catalog`` when given) holds featuredict tables of
    this schema version."""
    version = schema_version(con, catalog)
    if version is None:
        raise DatabaseError(
            f"{path} is not a featuredict database (no meta table). Build one with `featuredict build`."
        )
    if version != SCHEMA_VERSION:
        raise DatabaseError(
            f"{path} has schema version {version}, this featuredict reads version {SCHEMA_VERSION}. "
            "Rebuild it with `featuredict build` (labels are kept)."
        )


def copy_kept_rows(con: duckdb.DuckDBPyConnection, path: str | Path, sae_id: str) -> None:
    """Copy into ``con`` (a new file with this schema) what a rebuild of ``sae_id`` keeps from the database at
    ``path``: the build tables' rows of every other SAE and every user table whole.

    Raises DatabaseError when ``path`` cannot be read or holds another schema version.
    """
    old = _catalog(_OLD)
    try:
        con.execute(f"ATTACH ? AS {old} (READ_ONLY)", [str(path)])
    except duckdb.Error as e:
        msg = str(e).splitlines()[0]
        raise DatabaseError(
            f"cannot read the existing {path} to keep its labels and other SAEs: {msg}. "
            "If a program outside featuredict has it open, close it, or build into another file."
        ) from e
    try:
        check_version(con, path, catalog=_OLD)
        for t in BUILD_TABLES:
            # by name: a file written before a column of ADDED_COLUMNS existed gets NULL there
            con.execute(f"INSERT INTO {t} BY NAME SELECT * FROM {old}.{t} WHERE sae_id <> ?", [sae_id])  # noqa: S608
        kept = {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_catalog = ?", [_OLD]
            ).fetchall()
        }
        for t in USER_TABLES:
            if t in kept:  # a file written before this user table existed has none to keep
                con.execute(f"INSERT INTO {t} BY NAME SELECT * FROM {old}.{t}")  # noqa: S608

    finally:
        con.execute(f"DETACH {old}")


def check_file(path: str | Path) -> Path:
    """``path`` as a Path once it exists and is not empty; raises DatabaseError with a one-line message."""
    p = Path(path)
    if not p.exists():
        raise DatabaseError(f"No database at {p}. Build one with `featuredict build` or `featuredict demo`.")
    if p.stat().st_size == 0:
        raise DatabaseError(f"{p} is empty (0 bytes). Rebuild it with `featuredict build`.")
    return p


def missing_user_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """User tables the open file lacks (a file written before they existed; a read-write open adds them)."""
    have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    return [t for t in USER_TABLES if t not in have]


def connect(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open an existing featuredict database, checking it exists, is not locked and has our schema.

    Raises DatabaseError with a one-line, user-facing message on any problem. featuredict processes take turns
    through ``db.filelock`` (``db.store.Store`` does that); a lock error here means a program outside
    featuredict holds the file.
    """
    p = check_file(path)
    try:
        con = duckdb.connect(str(p), read_only=read_only)
    except duckdb.ConnectionException as e:  # this process already has it open with other settings
        msg = str(e).splitlines()[0]
        raise DatabaseError(
            f"{p} is already open in this process with other settings (read-write vs read-only): {msg}"
        ) from e
    except duckdb.IOException as e:  # another program holds the write lock
        msg = str(e).splitlines()[0]
        if "lock" in msg.lower():
            raise DatabaseError(f"{p} is locked by a program outside featuredict. Close it and retry. ({msg})") from e
        raise DatabaseError(f"Cannot open {p}: {msg}") from e
    except duckdb.Error as e:
        raise DatabaseError(f"{p} is not a readable DuckDB file: {str(e).splitlines()[0]}") from e
    try:
        check_version(con, p)
        if not read_only:
            # User tables may be missing in files written by older builds of the same version.
            for stmt in _USER_DDL:
                con.execute(stmt)
            add_missing_columns(con)
    except Exception:
        con.close()
        raise
    return con
