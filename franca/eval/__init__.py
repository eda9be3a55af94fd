"""Evaluations on frozen features (spec section 7).

Each tensor-level evaluation returns ``{"metrics": {flat name: float}, "details": {...}}``:
``knn.knn_classify`` (7.1), ``linear.linear_probe`` (7.2), ``logreg.logreg_eval`` (7.3),
``hummingbird.hummingbird_eval`` (7.4), ``linseg.linseg_eval`` (7.5), ``overcluster.overcluster_eval`` (7.6),
``position_probe.evaluate_position_probe`` (spec 5 / 10.1 row 11).  ``features`` extracts the tensors from a
backbone and samples; ``run.run_benchmark`` / ``run.write_eval_json`` tie both to the metrics JSON.
Modules are imported on use (no imports here) so that importing one evaluation does not pull in faiss or sklearn.
"""
