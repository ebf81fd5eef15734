"""ctssl: self-supervised pretraining benchmark and bias-analysis workbench for chest CT.

Library code: no Streamlit, no I/O at import time.
"""

__version__ = "0.1.0"
