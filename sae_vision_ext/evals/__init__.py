"""Evaluation of vision SAEs (no heavy imports here; import the submodules).

reconstruction   fvu, explained_variance, cosine_similarity, l0, fraction_zero, dead_latents, evaluate_sae
representation   cknna, mutual_knn, downstream_preservation, zero_shot_head, LinearProbe, fit_linear_probe
                 (scikit-learn), evaluate_downstream
dictionary       coherence, mutual_coherence, stable_rank, atom_data_distance, dictionary_report
stability        match_dictionaries, stability (Hungarian matching of atoms)
synthetic        sparse_dictionary_data, hierarchical_data, identifiability
compare          MethodSpec, train_method, evaluate_all (every metric for one SAE), evaluate_trained
report           run_report; ReportConfig in report_config, results.md in report_markdown
plots            plot_fvu_vs_l0 (the report's and the dashboard's), plot_stability
train            train_in_memory (SAELens SAETrainer on in-memory rows), to_inference_sae
data             load_rows (synthetic data, .pt/.npy/.safetensors files, cached-activation folders)
saved            load_sae_folder, evaluate_sae_folder

The command lines (``sae-vision report``, ``synthetic``, ``eval``) live in :mod:`sae_vision_ext.commands`.
``analysis`` may import ``evals``; ``evals`` never imports ``analysis``.
"""
