import os

# Nothing in the tests may reach for the network: the Hugging Face libraries stay offline.
os.environ["HF_HUB_OFFLINE"] = "1"
