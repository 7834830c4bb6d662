import os
import sys

# tests import the shared dense references as `reference` (bench/ does too)
sys.path.insert(0, os.path.dirname(__file__))
