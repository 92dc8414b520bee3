"""Triton's and KServe's own Python clients calling `igcam serve`, run by tests/test_serve_protocols.py in a virtualenv
of their own (tritonclient[http] and kserve, no igcam_engine: a client's process as its users run it).

    python protocol_clients.py BASE_URL MODEL REQUEST.json OUT.npz

REQUEST.json: {"pixels": "pixels.npy" (uint8 [B, H, W, 3]), "file": "photo.png", "parameters": {...}}. Writes every
client's answers into OUT.npz (maps and scores by client) and OUT.json (metadata, readiness, refusals)."""
import asyncio
import base64
import json
import sys

import numpy as np


def triton(base: str, model: str, pixels: np.ndarray, parameters: dict, arrays: dict, facts: dict) -> None:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(url=base.removeprefix("http://"), network_timeout=120)
    facts["triton"] = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                       "model_ready": client.is_model_ready(model), "metadata": client.get_model_metadata(model),
                       "server": client.get_server_metadata()}
    for binary in (True, False):
        image = http.InferInput("image", list(pixels.shape), "UINT8")
        image.set_data_from_numpy(pixels, binary_data=binary)
        outputs = [http.InferRequestedOutput(name, binary_data=binary) for name in ("maps", "scores", "classes")]
        result = client.infer(model, [image], outputs=outputs, parameters=parameters)
        for name in ("maps", "scores", "classes"):
            arrays[f"triton_{'binary' if binary else 'json'}_{name}"] = result.as_numpy(name)
    image = http.InferInput("image", list(pixels.shape), "UINT8")
    image.set_data_from_numpy(pixels)
    try:
        client.infer(model, [image], parameters={**parameters, "stpes": 3})
    except InferenceServerException as e:
        facts["triton"]["refused"] = {"status": e.status(), "message": e.message()}
    try:
        client.infer("nobody", [image])
    except InferenceServerException as e:
        facts["triton"]["unknown_model"] = {"status": e.status(), "message": e.message()}


async def kserve(base: str, model: str, pixels: np.ndarray, file: bytes, parameters: dict, arrays: dict,
                 facts: dict) -> None:
    import httpx
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    v1 = InferenceRESTClient(RESTConfig(protocol="v1", timeout=120))
    v2 = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    facts["kserve"] = {"v1_live": await v1.is_server_live(base), "v1_model_ready": await v1.is_model_ready(base, model),
                       "v2_live": await v2.is_server_live(base), "v2_ready": await v2.is_server_ready(base),
                       "v2_model_ready": await v2.is_model_ready(base, model)}
    for binary in (True, False):
        image = InferInput("image", list(pixels.shape), "UINT8")
        image.set_data_from_numpy(pixels, binary_data=binary)
        answer = await v2.infer(base, InferRequest(model, [image], parameters=parameters), model_name=model)
        for output in answer.outputs:
            if output.name in ("maps", "scores"):
                arrays[f"kserve_v2_{'binary' if binary else 'json'}_{output.name}"] = output.as_numpy()
    instances = [{"b64": base64.b64encode(file).decode()}, pixels[0].tolist()]
    predicted = await v1.infer(base, {"instances": instances}, model_name=model)
    explained = await v1.explain(base, model, {"instances": instances, "parameters": parameters})
    facts["kserve"]["v1_predictions"] = predicted["predictions"]
    facts["kserve"]["v1_explain_predictions"] = explained["predictions"]
    facts["kserve"]["v1_explanation"] = {k: v for k, v in explained["explanations"][0].items() if k != "maps"}
    for n, explanation in enumerate(explained["explanations"]):
        arrays[f"kserve_v1_maps_{n}"] = np.array(explanation["maps"], np.float32)
    try:
        await v1.explain(base, model, {"instances": instances, "parameters": {"steps": 0}})
    except httpx.HTTPStatusError as e:
        facts["kserve"]["refused"] = {"status": e.response.status_code, "message": str(e)}
    await v1.close()
    await v2.close()


def main(base: str, model: str, request: str, out: str) -> None:
    with open(request) as f:
        asked = json.load(f)
    pixels = np.load(asked["pixels"])
    with open(asked["file"], "rb") as f:
        file = f.read()
    arrays, facts = {}, {}
    triton(base, model, pixels, asked["parameters"], arrays, facts)
    asyncio.run(kserve(base, model, pixels, file, asked["parameters"], arrays, facts))
    np.savez(out, **arrays)
    with open(out.removesuffix(".npz") + ".json", "w") as f:
        json.dump(facts, f, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:])
