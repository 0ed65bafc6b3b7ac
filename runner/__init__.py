"""A distributed training runner for image classifiers, built on Hugging Face Accelerate."""
