"""sparkdl-hetero: distributed deep learning on Apache Spark with accelerator offload."""

__version__ = "0.1.0"
