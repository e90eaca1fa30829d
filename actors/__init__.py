import os

# Ray reads this when it is imported: keep every node and driver on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
