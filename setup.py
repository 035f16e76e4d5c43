from setuptools import find_packages, setup

# MLflow's tracking client without its server and UI: enough to log to a run (see sparkdl_hetero.ml.tracking)
MLFLOW = ["mlflow-skinny>=3"]
CONNECT = ["grpcio>=1.76.0", "grpcio-status>=1.76.0", "googleapis-common-protos>=1.71.0", "zstandard>=0.25.0"]

setup(
    name="sparkdl-hetero",
    version="0.1.0",
    description="Distributed deep learning on Apache Spark with accelerator offload (NumPy, OpenCL, CUDA)",
    packages=find_packages(include=["sparkdl_hetero", "sparkdl_hetero.*"]) + ["sparkdl_hetero.kernels"],
    # the OpenCL/CUDA sources live in the top-level kernels/ folder and install as sparkdl_hetero.kernels
    package_dir={"sparkdl_hetero.kernels": "kernels"},
    package_data={"sparkdl_hetero.kernels": ["*.cl", "*.cu", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.11",
        "pyspark>=4,<5",
        "pandas<3",
        "pyarrow>=15",
        "tqdm>=4.60",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        "opencl": ["pyopencl>=2024.1", "pyclblast>=1.4"],
        "gpu": ["cupy-cuda12x>=13"],
        "plot": ["matplotlib>=3.7"],
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        "mlflow": MLFLOW,
        # Spark Connect client (pyspark[connect]'s own pins for pyspark 4.3); the tests run every key scenario
        # through a Connect session too, so the test extra carries them
        "connect": CONNECT,
        # and MLflow, whose logging the tests read back from a local store
        "test": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.90", "ruff>=0.5", *CONNECT, *MLFLOW],
    },
)
