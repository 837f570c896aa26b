"""MLflow "models from code" entry point for the GRU4Rec pyfunc.

MLflow copies this file into the logged model and executes it at load time (with the model's ``code/``
folder, which holds the ``recsys`` package, on ``sys.path``), so the model class is imported, never
unpickled.
"""

import mlflow

from recsys.model.pyfunc import GRU4RecPyfunc

mlflow.models.set_model(GRU4RecPyfunc())
