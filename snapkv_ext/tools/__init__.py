"""The tools around the library: the `snapkv-ext` command line (cli), the evaluations it runs
(evaluate, haystack) and the model loaders (models: the embedded SmolLM2, tiny random-weight
models of every supported family, real 7B/8B shapes with random weights). Nothing here is needed
to use SnapKVCache."""
