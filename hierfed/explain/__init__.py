"""Interpretability and equity: what a trained federated model rests on, who contributed
what, and whom it serves worse.

* ``rebuild``: a run folder -> its config, federation and the trained model (driver side);
* ``scoring``: per-row scores of a model on a client's rows (accuracy hits, squared errors);
* ``equity``: metrics per institution and per group, their gaps, the light clients' share;
* ``attribution``: per-modality attributions (Captum) and component ablation;
* ``contribution``: leave-one-out from the Update algebra and sampled Shapley values;
* ``report``: ``python -m hierfed explain RUN_DIR`` (tables and plots).
"""
