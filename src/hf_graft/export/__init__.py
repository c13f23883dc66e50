"""The selected student as a folder that timm and transformers load, its model card, and the Hub."""
