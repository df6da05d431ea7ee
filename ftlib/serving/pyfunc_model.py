"""The MLflow pyfunc of a registered ftlib model, logged as code (MLflow "models from code"):
MLflow runs this file to rebuild the model, so nothing is unpickled at load time.

    mlflow.pyfunc.load_model("models:/ftlib-sentiment@champion").predict(["Great food!"])
"""

import mlflow

from ftlib.serving.serve import FtlibModel

mlflow.models.set_model(FtlibModel())
