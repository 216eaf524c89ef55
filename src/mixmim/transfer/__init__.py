"""Transfer tasks on the training loop: fine-tuning, linear probing, segmentation; k-NN."""
