"""Training pipeline: datasets, stages, LoRA/QLoRA, data conversion and the PhantomVQA set."""
