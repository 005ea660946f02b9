"""What the serving half (service/) and the training half (rlhf/) both speak, and nothing else: conversation
ids, the feedback record format the service writes and the trainer reads, and the adapter naming. Imports
nothing else of this project."""
