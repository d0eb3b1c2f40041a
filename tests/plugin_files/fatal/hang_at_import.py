"""A plugin file that never finishes importing."""
import time

while True:
    time.sleep(0.1)
