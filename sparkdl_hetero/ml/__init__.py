"""The Spark ML API: DeepClassifier and DeepClassificationModel."""
