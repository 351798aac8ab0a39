from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.split("#")[0].strip() for line in Path("requirements.txt").read_text().splitlines()]
setup(
    name="ltnet-keras",
    version="0.1.0",
    description="LT-Net (CVPR 2020) one-shot atlas-based brain MRI segmentation in tf.keras",
    packages=find_packages(include=["ltnet_keras", "ltnet_keras.*"]),
    python_requires=">=3.10",
    install_requires=[r for r in requirements if r],
    entry_points={"console_scripts": ["ltnet = ltnet_keras.cli:run"]},
)
