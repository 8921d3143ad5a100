"""The fine-tuning program: Ray Train TorchTrainer over Hugging Face transformers."""
