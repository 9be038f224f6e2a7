"""Why did the model say that: attribution of one output to SAE features, error nodes and tokens.

Modules: ``splice`` (SAEs spliced into the forward pass, error as a node), ``freeze`` (direct-effects mode:
attention patterns and norm scales frozen), ``attribute`` (targets and activation x gradient), ``checks``
(ablations and the sum check), ``graph`` (edges across SAEs, influence pruning, graph JSON), ``load`` (reading
a graph JSON back), ``quality`` (ΔLM loss, loss recovered, KL, FVE, L0 through the splice) and ``run`` (one
call that loads the SAEs of a database and does all of it). The maths is in docs/attribution.md.
"""
