"""The machinery below the assignment's files: configuration, data, model loading, the loss,
distributed training, checkpoints and the output folder. Nothing here imports the files on top
(train.py, lora_model.py, ...)."""
