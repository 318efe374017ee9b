"""gptneox: supervised fine-tuning of GPT-NeoX-family models in plain PyTorch."""
