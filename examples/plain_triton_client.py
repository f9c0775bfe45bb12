"""Score one article with a served filter using tritonclient alone: no filterserve needed.

    python examples/plain_triton_client.py [MODEL [URL [TITLE CONTENT]]]    # gRPC; defaults below

The ensemble named after the filter takes TITLE and CONTENT (one string each) and joins them with
the filter's own template. This prints the dimension names (the order of `scores` and
`final_scores`, from the ensemble config's `filter` parameter), then every output, one a line.
`tier` is an index into that parameter's `tiers` (name, threshold, description); -1 means none
was reached, which the filters' production scorer calls "low" ("No tier matched").
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

model = sys.argv[1] if len(sys.argv) > 1 else "uplifting_v4"
url = sys.argv[2] if len(sys.argv) > 2 else "localhost:8001"
title, content = sys.argv[3:5] if len(sys.argv) > 4 else ("Volunteers rebuild flooded library", "Residents reshelved 40,000 books.")

client = grpcclient.InferenceServerClient(url)
inputs = []
for name, text in (("TITLE", title), ("CONTENT", content)):
    tensor = grpcclient.InferInput(name, [1, 1], "BYTES")  # a batch of one article
    tensor.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=object))
    inputs.append(tensor)
outputs = [output["name"] for output in client.get_model_metadata(model, as_json=True)["outputs"]]
result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(name) for name in outputs])

described = client.get_model_config(model, as_json=True)["config"]["parameters"]["filter"]["string_value"]
print("dimensions:", json.dumps([dimension["name"] for dimension in json.loads(described)["dimensions"]]))
for name in outputs:
    print(f"{name}:", json.dumps(result.as_numpy(name)[0].tolist()))  # [0]: this article's row
