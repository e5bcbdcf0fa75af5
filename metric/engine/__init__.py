"""Everything that runs a model: the predictor (config + weights -> eval model and its
preprocessing), training, evaluation, feature extraction and the demo."""
