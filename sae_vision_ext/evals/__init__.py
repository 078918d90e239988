"""Evaluation of vision SAEs (no heavy imports here; import the submodules).

reconstruction  fvu, explained_variance, cosine_similarity, l0, fraction_zero, dead_latents, evaluate_sae
representation  cknna, mutual_knn, downstream_preservation, zero_shot_head, fit_linear_probe, evaluate_downstream
dictionary      coherence, mutual_coherence, stable_rank, atom_data_distance, dictionary_report
stability       match_dictionaries, stability (Hungarian matching of atoms)
synthetic       sparse_dictionary_data, hierarchical_data, identifiability; ``sae-vision synthetic``
compare         MethodSpec, train_method, evaluate_all (every metric for one SAE), evaluate_trained
report          run_report; ReportConfig in report_config; ``sae-vision report``
train           train_in_memory (SAELens SAETrainer on in-memory rows), to_inference_sae
data            load_rows (synthetic data, .pt/.npy/.safetensors files, cached-activation folders)
"""
