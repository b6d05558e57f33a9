"""The model wing: gates, gated modules, patching Hugging Face models in place, masks, compaction, save/load,
summaries and the model-family adapters (:mod:`.families`)."""
