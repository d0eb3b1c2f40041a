"""A plugin file that calls os._exit while it is imported."""
import os

os._exit(7)
