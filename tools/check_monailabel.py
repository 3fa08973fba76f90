"""Real-server check: a MONAI Label server (monaibundle sample app) serves and trains the fvae_aug_seg bundle.

Does what a MONAI Label user does, all on 127.0.0.1 and offline:

1. copies the `monaibundle` sample app out of the installed monailabel wheel (`monailabel apps --download`),
   and the unpacked bundle into the app's model folder, `<work>/monaibundle/model/<bundle name>`;
2. builds a local datastore: `<work>/studies/<id>.nii.gz` and, for the images that have one,
   `<work>/studies/labels/final/<id>.nii.gz` (MONAI Label's layout; labelled images are the training pairs),
   plus `<id>_lps`, a copy of the first image stored in LPS orientation (same voxels in the world), so that
   inference has to restore a non-RAS geometry;
3. starts `monailabel start_server --app ... --studies ... --conf models <bundle> --conf zoo_source github
   --conf sam2 false` (the venv's bin first on PATH; without PYTHONPATH / FVAE_ASSETS, so the bundle must
   carry its own code) in a new process group, its log in `<work>/server.log`, and waits for GET /info/;
4. GET /info/ (the model is an infer model and a trainer), GET /datastore/ (all images, training pairs);
5. POST /infer/<model>?image=<id> for the first image and its LPS copy: the returned label map must have the
   image's shape and exactly its affine, label ids within the bundle's ids (metadata.json channel_def);
6. POST /train/<model> with a tiny budget, once per reconstruction view (`recon_mode` none, online, precomputed,
   set through the bundle's `displayable_configs`), polls GET /train/ until the task ends; it must end DONE and
   rewrite models/model.pt (precomputed: the reconstructions are made on first use in <bundle>/recon); then
   infers once more (the server reloads the new weights);
7. stops the server (SIGTERM to its process group, SIGKILL after a grace period) in a `finally`.

`--from-scratch` instead checks what a team sees with the archive as downloaded (no models/model.pt): only
`--n-labelled` images get labels (default 2), /info/ lists the trainer but no infer model, POST /infer fails (MONAI
Label 0.8.5 answers HTTP 500 when the model file is missing), a train request with MONAI Label's default val_split
0.2 (so 0 validation cases) must end DONE and save models/model.pt + model.json (selected_by last_epoch), a train
request with only some options set is tried; then the labels become a multi-organ map (ids 5 and 117): a train
request must be refused by the bundle in one line (file, ids, classes) and, with ``label_map`` {"5": 1, "117": 2},
train; then the server is restarted (the new model appears in /info/ only after a restart) and infers.

Prints one PASSED/FAILED line per step and exits non-zero on any failure. Needs only the standard library,
numpy and nibabel, so it runs with the MONAI Label venv's python:

    .venv-monailabel/bin/python tools/check_monailabel.py --bundle <unpacked fvae_aug_seg> \
        --images <dir>/imagesTr --labels <dir>/labelsTr --work outputs/mlcheck/server --port 8123 \
        --train-overrides '{"max_epochs": 2}'
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

NII = (".nii.gz", ".nii")
RESULTS: list[tuple[str, bool, str]] = []


class CheckError(Exception):
    pass


def step(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, ok, detail))
    print(f"{'PASSED' if ok else 'FAILED'}: {name}" + (f" -- {detail}" if detail else ""), flush=True)
    return ok


def require(name: str, ok: bool, detail: str = "") -> None:
    if not step(name, ok, detail):
        raise CheckError(name)


def case_id(p: Path) -> str:
    for ext in NII:
        if p.name.endswith(ext):
            return p.name[: -len(ext)]
    return p.stem


def nifti_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(NII))


# ---------------------------------------------------------------------------------------------------- HTTP client
class Client:
    def __init__(self, port: int, timeout: float = 600):
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        # never a proxy for the loopback server
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method, path, body=None, headers=None, timeout=None):
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=timeout or self.timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def get_json(self, path, timeout=None):
        status, _, body = self.request("GET", path, timeout=timeout)
        return status, (json.loads(body) if body else None)

    def post_json(self, path, obj):
        status, _, body = self.request("POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})
        return status, (json.loads(body) if body else None)

    def post_form(self, path, fields: dict):
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                for k, v in fields.items()
            )
            + f"--{boundary}--\r\n".encode()
        )
        return self.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def split_multipart(content_type: str, body: bytes) -> dict:
    """name -> (filename or None, bytes) of a multipart/form-data response (MONAI Label's infer output=all)."""
    boundary = [p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")]
    if not boundary:
        raise ValueError(f"no multipart boundary in {content_type!r}")
    parts = {}
    for chunk in body.split(b"--" + boundary[0].encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        data = data[:-2] if data.endswith(b"\r\n") else data
        disp = [h for h in head.decode("latin-1").split("\r\n") if h.lower().startswith("content-disposition")]
        attrs = {}
        for item in (disp[0].split(";")[1:] if disp else []):
            k, _, v = item.strip().partition("=")
            attrs[k] = v.strip('"')
        parts[attrs.get("name", str(len(parts)))] = (attrs.get("filename"), data)
    return parts


# ---------------------------------------------------------------------------------------------------- set-up
def find_monailabel(venv: Path) -> Path:
    exe = venv / "bin" / "monailabel"
    if not exe.is_file():
        raise CheckError(f"no monailabel script at {exe} (pass --venv <monailabel virtualenv>)")
    return exe


def server_env(venv: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    env["MONAILABEL_PYEXE"] = str(venv / "bin" / "python")
    env["VIRTUAL_ENV"] = str(venv)
    # what a MONAI Label user has: nothing of this project on the path, no project asset folder
    for k in ("PYTHONPATH", "FVAE_ASSETS", "PYTHONHOME"):
        env.pop(k, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # no proxy for loopback (the server itself never goes out: zoo_source github + local bundle, sam2 false)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def install_app(exe: Path, env: dict, work: Path, bundle: Path, skip: list[str]) -> tuple[Path, Path]:
    """The `monaibundle` sample app copied out of the installed wheel into ``work``, and ``bundle`` (less ``skip``)
    into its model folder; returns (app folder, bundle copy)."""
    r = subprocess.run(
        [str(exe), "apps", "--download", "--name", "monaibundle", "--output", str(work)],
        env=env,
        capture_output=True,
        text=True,
        cwd=work,
    )
    app = work / "monaibundle"
    out = (r.stdout + r.stderr).strip()
    require(
        "monailabel apps --download --name monaibundle",
        r.returncode == 0 and (app / "main.py").is_file(),
        out.splitlines()[-1] if out else "",
    )
    dst = app / "model" / bundle.name
    shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *skip))
    return app, dst


def make_lps_copy(src: Path, dst: Path) -> None:
    """The same image in the world, stored with the first two voxel axes reversed (RAS -> LPS storage)."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    out = nib.Nifti1Image(data[::-1, ::-1].copy(), img.affine @ flip, img.header)
    out.set_qform(img.affine @ flip, code=1)
    out.set_sform(img.affine @ flip, code=1)
    nib.save(out, str(dst))


def build_studies(images: Path, labels: Path | None, studies: Path, lps_copy: bool, n_labelled: int | None = None):
    shutil.rmtree(studies, ignore_errors=True)
    (studies / "labels" / "final").mkdir(parents=True)
    imgs = nifti_files(images)
    if not imgs:
        raise CheckError(f"no NIfTI images in {images}")
    lab_by_id = {case_id(p): p for p in nifti_files(labels)} if labels else {}
    ids, labelled = [], []
    for p in imgs:
        cid = case_id(p)
        ext = p.name[len(cid) :]
        shutil.copy(p, studies / f"{cid}{ext}")
        ids.append(cid)
        if cid in lab_by_id and (n_labelled is None or len(labelled) < n_labelled):
            lp = lab_by_id[cid]
            shutil.copy(lp, studies / "labels" / "final" / f"{cid}{lp.name[len(case_id(lp)):]}")
            labelled.append(cid)
    if lps_copy:
        cid = ids[0] + "_lps"
        make_lps_copy(imgs[0], studies / f"{cid}.nii.gz")
        ids.append(cid)
    return ids, labelled


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT of a last run is no user
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def log_tail(log: Path, n: int = 60) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no server log)"


def wait_ready(client: Client, proc: subprocess.Popen, timeout: float) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise CheckError(f"server exited with code {proc.returncode} before it was ready")
        try:
            status, info = client.get_json("/info/", timeout=10)
            if status == 200:
                return info
        except OSError:  # URLError, refused connection, reset, timeout
            pass
        time.sleep(2)
    raise CheckError(f"server not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, grace: float = 30) -> str:
    if proc.poll() is not None:
        return f"already exited with code {proc.returncode}"
    pgid = proc.pid  # started with start_new_session=True: the server leads its own process group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
        how = f"SIGTERM, exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=30)
        how = "SIGKILL after SIGTERM timed out"
    try:  # stragglers of the group (a training subprocess)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return how


def stop_and_report(proc, log: Path, lines: int) -> None:
    """The last step of a check: the server (if started) stopped by its process group, and the tail of its log
    printed when any step failed."""
    if proc is not None:
        how = stop_server(proc)
        step(f"server stopped (PID {proc.pid}, process group)", proc.poll() is not None, how)
    if any(not ok for _, ok, _ in RESULTS) and log.is_file():
        print("---- server.log (tail) ----\n" + log_tail(log, lines), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- checks
def check_label_map(name: str, label_bytes: bytes, filename: str, image: Path, out: Path, ids: set) -> None:
    suffix = ".nii.gz" if (filename or "").endswith(".gz") or label_bytes[:2] == b"\x1f\x8b" else ".nii"
    out.parent.mkdir(parents=True, exist_ok=True)
    dst = out.with_name(out.name + suffix)
    dst.write_bytes(label_bytes)
    img, lab = nib.load(str(image)), nib.load(str(dst))
    found = set(np.unique(np.asarray(lab.dataobj)).astype(int).tolist())
    diff = float(np.abs(lab.affine - img.affine).max())
    detail = (
        f"{dst.name}: shape {lab.shape} vs {img.shape}, affine max |diff| {diff:.3g}, "
        f"ids {sorted(found)} (allowed {sorted(ids)}), axcodes {''.join(nib.aff2axcodes(lab.affine))}"
    )
    step(f"{name}: label map shape", tuple(lab.shape[:3]) == tuple(img.shape[:3]) and len(lab.shape) in (3, 4), detail)
    step(
        f"{name}: label map affine (exact)",
        np.array_equal(lab.affine, img.affine),
        f"max |diff| {diff:.3g}\n  image {img.affine.tolist()}\n  label {lab.affine.tolist()}" if diff else "",
    )
    step(f"{name}: label ids within {sorted(ids)}", found <= ids, str(sorted(found)))


def infer(client: Client, model: str, cid: str, studies: Path, out_dir: Path, ids: set, params: dict, tag: str):
    t0 = time.time()
    q = urllib.parse.urlencode({"image": cid, "output": "all"})
    status, headers, body = client.post_form(f"/infer/{model}?{q}", {"params": json.dumps(params)})
    dt = time.time() - t0
    if not step(f"{tag}: POST /infer/{model}?image={cid}", status == 200, f"HTTP {status} in {dt:.1f} s"):
        print(body[:2000].decode(errors="replace"), file=sys.stderr)
        return dt
    ctype = headers.get("Content-Type", "")
    if ctype.startswith("multipart/"):
        parts = split_multipart(ctype, body)
        fname, data = parts.get("image", (None, b""))
        print(f"  infer params: {parts.get('params', (None, b'{}'))[1][:300].decode(errors='replace')}")
    else:  # only a JSON answer: no label image
        fname, data = None, b""
    if not step(f"{tag}: label map returned", bool(data), f"{ctype.split(';')[0]}, {len(data)} bytes, {fname}"):
        print(body[:2000].decode(errors="replace"), file=sys.stderr)
        return dt
    image = next(p for p in studies.iterdir() if p.is_file() and case_id(p) == cid)
    check_label_map(tag, data, fname, image, out_dir / f"{tag}_{cid}_seg", ids)
    return dt


def file_state(p: Path):
    return (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None


def train_once(
    a, client, proc, info: dict, model: str, dst: Path, log: Path, mode: str, timings: dict, extra: dict | None = None
) -> dict:
    """POST /train/<model> with recon_mode ``mode``; it must end DONE, start from the bundle's model.pt and write a
    new one; ``precomputed`` must leave the cached reconstructions in <bundle>/recon."""
    model_pt = dst / "models" / "model.pt"
    before = file_state(model_pt)
    recons_before = set((dst / "recon").glob("*_recon.nii.gz"))
    # what a MONAI Label client sends: the trainer's config from /info/ (a list means "pick one": its first entry),
    # with this check's tiny budget on top
    defaults = (info.get("trainers", {}).get(model) or {}).get("config", {})
    # (empty strings are "not set": run_id "" would make the bundle run its whole config instead of run)
    # (and empty lists: model_filename [] before any model.pt exists would make MONAI Label index [][0])
    body = {k: (v[0] if isinstance(v, list) and v else v) for k, v in defaults.items() if v not in ("", [])}
    body.update({"device": a.device, "max_epochs": 1, "val_split": 0.5, "multi_gpu": False, "pretrained": True})
    body.update(json.loads(a.train_params))
    body["recon_mode"] = mode
    body.update(extra or {})  # --from-scratch: MONAI Label's default val_split
    print("train request:", json.dumps(body), flush=True)
    t0 = time.time()
    status, task = client.post_json(f"/train/{model}", body)
    require(
        f"POST /train/{model} (recon_mode {mode})",
        status == 200 and isinstance(task, dict),
        f"HTTP {status}: {json.dumps(task)[:300]}",
    )
    last = wait_train(client, proc, task.get("id"), a.train_timeout)
    timings[f"train_{mode}_s"] = time.time() - t0
    st = (last or {}).get("status")
    ok = step(
        f"training task (recon_mode {mode}) finished DONE", st == "DONE", f"status {st} after {time.time() - t0:.1f} s"
    )
    if not ok:
        if st not in ("DONE", "ERROR", "STOPPED"):
            client.request("DELETE", "/train/")
        print("  last train log lines:\n    " + "\n    ".join((last or {}).get("details", [])), file=sys.stderr)
    after = file_state(model_pt)
    hint = "" if after != before or not ok else " (no validation ran? train.yaml's val_interval > max_epochs)"
    step(
        f"training (recon_mode {mode}) wrote a new models/model.pt",
        after is not None and after != before,
        f"before {before}, after {after}{hint}",
    )
    if ok and body.get("pretrained") and before is not None:
        restored = "Restored all variables from " + str(model_pt)
        step("training started from the bundle's models/model.pt", restored in log.read_text(errors="replace"))
    recons = set((dst / "recon").glob("*_recon.nii.gz")) - recons_before
    if mode == "precomputed":
        step("precomputed view: reconstructions made on first use in <bundle>/recon", len(recons) > 0, f"{len(recons)}")
    else:
        step(f"recon_mode {mode}: no reconstruction files written", not recons, f"{len(recons)}")
    if not ok:
        raise CheckError(f"training with recon_mode {mode} failed")
    return body


def wait_train(client, proc, task_id, timeout: float):
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        time.sleep(5)
        if proc.poll() is not None:
            raise CheckError(f"server died during training (code {proc.returncode})")
        status, t = client.get_json("/train/", timeout=30)
        if status == 200 and t and t.get("id") == task_id:
            last = t
            if t.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
    return last or {}


def partial_train_request(a, client, proc, info: dict, model: str, log: Path) -> None:
    """POST /train/<model> with only recon_mode of the bundle's options (a REST client, not the /info/ panel). It
    must end DONE, or fail only where MONAI Label 0.8.5 itself reads every displayable option (request[c] in
    monailabel/tasks/train/bundle.py): never in the bundle (train.yaml reads each option with its default)."""
    body = {"device": a.device, "max_epochs": 1, "multi_gpu": False, "recon_mode": "none"}
    print("partial train request:", json.dumps(body), flush=True)
    status, task = client.post_json(f"/train/{model}", body)
    require("POST /train (only recon_mode set)", status == 200 and isinstance(task, dict), f"HTTP {status}")
    last = wait_train(client, proc, task.get("id"), a.train_timeout)
    st, details = last.get("status"), "\n".join(last.get("details", []))
    text = details + log.read_text(errors="replace")
    upstream = st == "ERROR" and "KeyError" in text and "request[c]" in text and "monailabel/tasks/train/bundle.py" in text
    step(
        "train request with only recon_mode: DONE, or refused by MONAI Label itself (not the bundle)",
        st == "DONE" or upstream,
        f"status {st}"
        + ("; MONAI Label 0.8.5 reads every displayable option: request[c] KeyError (README: send them all)"
           if upstream else ""),
    )
    if st not in ("DONE", "ERROR", "STOPPED"):
        client.request("DELETE", "/train/")


def multi_organ_training(a, client, proc, info: dict, model: str, dst: Path, log: Path, studies: Path,
                         timings: dict) -> None:
    """The datastore's labels as a multi-organ map (ids 1 -> 5 and 2 -> 117, TotalSegmentator-like): a train request
    as the /info/ panel sends it must be refused by the bundle in one line naming the file, the ids and the classes;
    the same request with ``label_map`` {"5": 1, "117": 2} must train and write a model."""
    import nibabel as nib
    import numpy as np

    files = sorted((studies / "labels" / "final").glob("*.nii*"))
    for f in files:
        img = nib.load(str(f))
        lab = np.asarray(img.dataobj)
        out = np.zeros(lab.shape, np.uint8)
        out[lab == 1], out[lab == 2] = 5, 117
        nib.save(nib.Nifti1Image(out, img.affine, img.header), str(f))
    step("datastore labels rewritten as a multi-organ map (ids 5, 117)", bool(files), f"{len(files)} files")
    defaults = (info.get("trainers", {}).get(model) or {}).get("config", {})
    body = {k: (v[0] if isinstance(v, list) and v else v) for k, v in defaults.items() if v not in ("", [])}
    body.update({"device": a.device, "max_epochs": 1, "multi_gpu": False, "recon_mode": "none"})
    print("multi-organ train request (no label_map):", json.dumps(body), flush=True)
    status, task = client.post_json(f"/train/{model}", body)
    require("POST /train (multi-organ labels, no label_map)", status == 200 and isinstance(task, dict), f"HTTP {status}")
    last = wait_train(client, proc, task.get("id"), a.train_timeout)
    text = "\n".join(last.get("details", [])) + log.read_text(errors="replace")
    refusal = [x for x in text.splitlines() if "InputError" in x and "117" in x and "label_map" in x]
    step(
        "multi-organ labels without label_map: refused before training, one line naming the file, ids and classes",
        last.get("status") == "ERROR" and bool(refusal) and "out of bounds" not in text,
        refusal[-1].strip()[:300] if refusal else f"status {last.get('status')}",
    )
    train_once(a, client, proc, info, model, dst, log, "none", timings, {"label_map": '{"5": 1, "117": 2}'})
    step("multi-organ labels with label_map {\"5\": 1, \"117\": 2}: trained (above)", True)


def start_server(a, exe, app, studies, env, model, log: Path):
    free = port_free(a.port)
    require(f"port {a.port} is free on 127.0.0.1", free, "" if free else "in use: pass another --port")
    conf = {"models": model, "zoo_source": "github", "sam2": "false", "preload": "false"}
    cmd = [str(exe), "start_server", "--app", str(app), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(a.port)]
    cmd += [x for k, v in conf.items() for x in ("--conf", k, v)]
    print("server command:", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as fp:
        proc = subprocess.Popen(
            cmd, env=env, cwd=app.parent, stdout=fp, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    client = Client(a.port, timeout=a.infer_timeout)
    try:
        info = wait_ready(client, proc, a.start_timeout)
    except CheckError:
        stop_server(proc)
        raise
    dt = time.time() - t0
    step("server ready (GET /info/ 200)", True, f"PID {proc.pid}, {dt:.1f} s")
    return proc, client, info, dt


def from_scratch(a, client, proc, info, model, dst, log, ids, labelled, studies, label_ids, timings) -> None:
    """The archive as downloaded: no model yet; a first training with MONAI Label's default val_split."""
    step(f"/info/ lists trainer {model}", model in info.get("trainers", {}), f"trainers {list(info.get('trainers', {}))}")
    step(
        f"no model yet: /info/ lists no infer model {model} (MONAI Label skips a bundle without models/model.pt)",
        model not in info.get("models", {}),
        f"models {list(info.get('models', {}))}",
    )
    status, _, body = client.post_form(f"/infer/{model}?image={urllib.parse.quote(ids[0])}", {"params": "{}"})
    step(
        "no model yet: POST /infer fails (0.8.5: HTTP 500, 'BundleInferTask' object has no attribute 'description')",
        status != 200,
        f"HTTP {status}: {body[:200].decode(errors='replace')}",
    )
    defaults = (info.get("trainers", {}).get(model) or {}).get("config", {})
    step("trainer's default val_split is 0.2", defaults.get("val_split") == 0.2, str(defaults.get("val_split")))
    body = train_once(
        a, client, proc, info, model, dst, log, "none", timings, {"val_split": defaults.get("val_split", 0.2)}
    )
    print(f"  first training: {len(labelled)} labelled images, val_split {body.get('val_split')}")
    rec_path = dst / "models" / "model.json"
    rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    step(
        "first training saved models/model.json (selected_by last_epoch: no validation case)",
        rec.get("selected_by") == "last_epoch",
        json.dumps({k: rec.get(k) for k in ("selected_by", "epochs", "best_metric")}),
    )
    text = log.read_text(errors="replace")
    step("the train log warns that validation is empty", "validation is empty" in text)
    partial_train_request(a, client, proc, info, model, log)
    multi_organ_training(a, client, proc, info, model, dst, log, studies, timings)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="unpacked bundle folder (configs/, models/model.pt)")
    ap.add_argument("--images", required=True, type=Path, help="folder of NIfTI images")
    ap.add_argument("--labels", type=Path, help="folder of label maps with the images' file names")
    ap.add_argument("--work", required=True, type=Path, help="scratch folder (emptied)")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--venv", type=Path, default=Path(sys.prefix), help="MONAI Label virtualenv (default: this one)")
    ap.add_argument("--device", default="cpu", help="device for infer and train requests")
    ap.add_argument(
        "--train-overrides",
        "--train-params",
        dest="train_params",
        default="{}",
        help="JSON merged into the POST /train/<model> body",
    )
    ap.add_argument("--no-train", action="store_true", help="skip the train step")
    ap.add_argument(
        "--recon-modes", default="none,online,precomputed", help="one tiny training per recon_mode (comma-separated)"
    )
    ap.add_argument("--no-lps", action="store_true", help="no LPS-stored copy of the first image")
    ap.add_argument(
        "--from-scratch",
        action="store_true",
        help="the archive as downloaded: no models/model.pt; train with the default val_split, restart, infer",
    )
    ap.add_argument("--n-labelled", type=int, default=None, help="label only the first N images (--from-scratch: 2)")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--train-timeout", type=float, default=1800)
    ap.add_argument("--infer-timeout", type=float, default=900)
    a = ap.parse_args()

    # a SIGTERM of the check (make, CI timeout) still runs the `finally` that stops the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_all = time.time()
    bundle = a.bundle.resolve()
    model = bundle.name
    work = a.work.resolve()
    venv = a.venv.resolve()
    timings: dict[str, float] = {}
    proc = None
    try:
        require(
            "bundle folder",
            (bundle / "configs" / "metadata.json").is_file()
            and (a.from_scratch or (bundle / "models" / "model.pt").is_file()),
            str(bundle),
        )
        if a.from_scratch and a.n_labelled is None:
            a.n_labelled = 2
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        pred = next(iter(meta["network_data_format"]["outputs"].values()))
        label_ids = {int(k) for k in pred.get("channel_def", {})} or {0, 1}
        exe = find_monailabel(venv)
        env = server_env(venv)

        # the bundle's own code must come from the bundle, not from the venv
        r = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import fvae_ct"], env=env, cwd="/", capture_output=True
        )
        step(
            "fvae_ct is not installed in the MONAI Label venv (the bundle's vendored copy is what runs)",
            r.returncode != 0,
            "" if r.returncode else "importable without the bundle: the check proves less",
        )

        # 1. app + bundle
        if work.exists() and any(work.iterdir()):
            if not any((work / n).exists() for n in ("report.json", "server.log", "monaibundle", "studies")):
                raise CheckError(f"--work {work} is a non-empty folder this check did not make; not deleting it")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        skip = ["model.pt", "model.json"] if a.from_scratch else []
        app, dst = install_app(exe, env, work, bundle, skip)
        step(
            "bundle copied into the app's model folder"
            + (" (as downloaded: no models/model.pt)" if a.from_scratch else ""),
            (dst / "models" / "model.pt").is_file() != a.from_scratch,
            str(dst),
        )

        # 2. datastore
        studies = work / "studies"
        ids, labelled = build_studies(a.images, a.labels, studies, not a.no_lps, a.n_labelled)
        step("datastore folder", True, f"{len(ids)} images ({ids}), {len(labelled)} with labels/final")

        # 3. server (never talk to someone else's server on the same port)
        log = work / "server.log"
        proc, client, info, timings["server_start_s"] = start_server(a, exe, app, studies, env, model, log)

        if a.from_scratch:
            from_scratch(a, client, proc, info, model, dst, log, ids, labelled, studies, label_ids, timings)
            # the trained model is listed only after a restart (MONAI Label builds its infer tasks at start)
            how = stop_server(proc)
            step(f"server stopped for the restart (PID {proc.pid})", proc.poll() is not None, how)
            proc, client, info, timings["server_restart_s"] = start_server(a, exe, app, studies, env, model, log)
            a.no_train = True  # trained above; now the ordinary checks of the served model

        # 4. info, datastore
        m = info.get("models", {}).get(model)
        require(f"/info/ lists model {model}", m is not None, f"models {list(info.get('models', {}))}")
        print(f"  /info/ model: type {m.get('type')}, labels {m.get('labels')}, dimension {m.get('dimension')}")
        step(
            f"/info/ labels of {model} match metadata.json",
            set(m.get("labels", {}).values()) == label_ids - {0},
            str(m.get("labels")),
        )
        has_trainer = model in info.get("trainers", {})
        step(f"/info/ lists trainer {model}", has_trainer, f"trainers {list(info.get('trainers', {}))}")
        status, ds = client.get_json("/datastore/?output=all")
        objs = (ds or {}).get("objects", {})
        step("/datastore/ lists the images", status == 200 and set(ids) <= set(objs), f"HTTP {status}, {sorted(objs)}")
        status, dl = client.get_json("/datastore/?output=train")
        pairs = {case_id(Path(d["image"])) for d in (dl or []) if d.get("label")}
        step(
            "/datastore/?output=train has the image+label pairs",
            status == 200 and pairs == set(labelled),
            f"{sorted(pairs)}",
        )

        # 5. inference
        infer_params = {"device": a.device}
        out_dir = work / "results"
        for cid in [ids[0]] + ([ids[-1]] if not a.no_lps else []):
            timings[f"infer_{cid}_s"] = infer(client, model, cid, studies, out_dir, label_ids, infer_params, "infer")

        # 6. training, once per reconstruction view (train.yaml's displayable_configs: the request sets recon_mode)
        if not a.no_train and has_trainer:
            for mode in [m for m in a.recon_modes.split(",") if m]:
                train_once(a, client, proc, info, model, dst, log, mode, timings)
                timings[f"infer_after_train_{mode}_s"] = infer(
                    client, model, ids[0], studies, out_dir, label_ids, infer_params, f"infer-after-train-{mode}"
                )
        elif not a.no_train:
            step("train step", False, "no trainer registered")
    except CheckError as e:
        if str(e) not in [n for n, ok, _ in RESULTS if not ok]:  # not already reported by require()
            step(str(e), False)
    except Exception as e:  # an unexpected error of the check itself
        step(f"unexpected {type(e).__name__}", False, str(e))
        import traceback

        traceback.print_exc()
    finally:
        stop_and_report(proc, work / "server.log", 80)

    timings["total_s"] = time.time() - t_all
    work.mkdir(parents=True, exist_ok=True)
    failed = [n for n, ok, _ in RESULTS if not ok]
    (work / "report.json").write_text(
        json.dumps({"passed": not failed, "failed": failed, "timings": timings, "steps": RESULTS}, indent=1)
    )
    print("timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    print(
        f"MONAI Label server check: {'PASSED' if not failed else 'FAILED'} "
        f"({len(RESULTS) - len(failed)}/{len(RESULTS)} steps){'; failed: ' + '; '.join(failed) if failed else ''}"
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
