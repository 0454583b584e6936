"""train_ghn: meta-training of graph hypernetworks (samplers, data, training loop, evaluation)."""
