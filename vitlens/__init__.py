"""vitlens: a logit lens for Vision Transformer image classifiers.

Projects what every token holds, at every block, onto the model's own class-embedding
space (Vilas, Schaumlöffel & Roig, NeurIPS 2023) and runs that analysis as a batch job.
Layers (imports point down only): data -> models -> lens -> metrics -> store -> runner -> cli.
"""

__version__ = "0.1.0"
