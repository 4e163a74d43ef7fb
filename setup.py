from setuptools import setup

# Metadata lives in setup.cfg; this file exists so that `pip install -e .` works with older tooling
# and so that twisted/plugins/ is shipped as data (it must not be a package).
setup()
