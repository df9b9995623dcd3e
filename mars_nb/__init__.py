"""Where should MARS (multi-view consistency regularization) hook into Mask2Former for rotation robustness, and does it help?"""

__version__ = "0.1.0"
