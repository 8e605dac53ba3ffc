"""A procedural world where the method can be measured: scenes of coloured shapes with captions
(scene.py), personal concepts no caption can name (scene.py), and metrics read exactly from
pixels (read.py)."""
