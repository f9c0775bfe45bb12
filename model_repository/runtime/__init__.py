"""What runs inside tritonserver, apart from the code that writes a repository for it.

- ``templates/tokenizer_model.py``: the tokenizer step, copied into every repository as its
  ``model.py``. It runs in NVIDIA's container too, where this package is not installed, so it
  imports nothing of filterserve: it loads the copies of ``contract.py`` and ``head_tail.py`` that
  the writer puts beside it, and reads everything else from its model config.
- ``backends/{onnxruntime,openvino}/model.py`` and :mod:`.tensor_backend`: the Python-backend
  stand-ins for Triton's C++ tensor backends, which ``filterserve serve`` puts in tritonserver's
  backend directory. They run in the stub of ``filterserve serve``'s own interpreter, so they
  import core (the contract) and this package.
- :mod:`.openvino`: how Triton's OpenVINO backend reads its config, and the stand-in's own file.

Nothing here imports the writers (the rest of :mod:`filterserve.model_repository`): what runs
inside the server must not need protobuf configs or ONNX graph building. The writers import
:mod:`.openvino`, whose rules say what they may write.
"""
