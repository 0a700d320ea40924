"""Uploads one file to a tus server with tuspy, as a Python program would, for the end-to-end
tests (e2e/tests/e2e/tus_clients.rs).

    python3 tuspy_upload.py '<options as JSON>'      (or the path of a JSON file)

Options:
    endpoint         the creation URL (`http://127.0.0.1:PORT/files/`)
    file             the path of the file to upload
    chunkSize        bytes per PATCH (default: the whole rest of the file in one)
    headers          sent with every request (e.g. Authorization)
    metadata         Upload-Metadata ({filename, filetype})
    uploadUrl        resume this upload (tuspy asks its offset with a HEAD) instead of creating one
    stopAfterChunks  stop after this many PATCHes, as an interrupted program would
    uploadChecksum   send Upload-Checksum (sha1) with every PATCH

Output: JSON lines on stdout: {"event":"url"|"chunk",...} as things happen, then one final
{"ok":true,"url":...,"bytesUploaded":...,"startOffset":...} (with "stopped":true when
stopAfterChunks stopped it) or {"ok":false,"error":...,"status":...,"body":...,"url":...}.
Exit status: 0 on success or a deliberate stop, 1 when the upload failed, 2 when the client could
not run at all (tuspy not installed, bad options).

tuspy comes from the Python on PATH: `cargo xtask test` puts its virtual environment first.
"""

import json
import sys


def emit(line):
    print(json.dumps(line), flush=True)


def load_options():
    if len(sys.argv) != 2:
        raise ValueError("usage: python3 tuspy_upload.py <options as JSON, or a JSON file>")
    arg = sys.argv[1]
    if arg.lstrip().startswith("{"):
        return json.loads(arg)
    with open(arg, encoding="utf-8") as f:
        return json.load(f)


def failure(error, uploader, chunks):
    status = getattr(error, "status_code", None)
    body = getattr(error, "response_content", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return {
        "ok": False,
        "error": str(error) or type(error).__name__,
        "kind": type(error).__name__,
        "status": status,
        "body": body,
        "url": getattr(uploader, "url", None),
        "bytesUploaded": getattr(uploader, "offset", None),
        "chunks": chunks,
    }


def run(client_module, options):
    client = client_module.TusClient(options["endpoint"], headers=options.get("headers") or {})
    kwargs = {
        "file_path": options["file"],
        "metadata": options.get("metadata") or {},
        "upload_checksum": bool(options.get("uploadChecksum", False)),
        "retries": 0,
    }
    if options.get("chunkSize") is not None:
        kwargs["chunk_size"] = int(options["chunkSize"])
    if options.get("uploadUrl"):
        kwargs["url"] = options["uploadUrl"]
    uploader = None
    chunks = 0
    try:
        # With a URL, the constructor asks the server for the offset (HEAD).
        uploader = client.uploader(**kwargs)
        start_offset = uploader.offset
        if uploader.url is None:
            uploader.set_url(uploader.create_url())
            uploader.offset = 0
        emit({"event": "url", "url": uploader.url, "offset": start_offset})
        size = uploader.get_file_size()
        stop_after = options.get("stopAfterChunks")
        while uploader.offset < size:
            uploader.upload_chunk()
            chunks += 1
            emit({"event": "chunk", "bytesAccepted": uploader.offset, "bytesTotal": size})
            if stop_after is not None and chunks >= stop_after and uploader.offset < size:
                return {
                    "ok": True,
                    "stopped": True,
                    "url": uploader.url,
                    "bytesUploaded": uploader.offset,
                    "startOffset": start_offset,
                    "chunks": chunks,
                }, 0
        return {
            "ok": True,
            "url": uploader.url,
            "bytesUploaded": uploader.offset,
            "startOffset": start_offset,
            "chunks": chunks,
        }, 0
    except Exception as error:  # noqa: BLE001 - every failure is reported, not raised
        return failure(error, uploader, chunks), 1


def main():
    try:
        import tusclient.client as client_module
    except ImportError as error:
        emit({
            "ok": False,
            "setup": True,
            "error": f"tuspy cannot be imported by {sys.executable} ({error}); "
                     "`cargo xtask test` installs it and puts its venv first on PATH",
        })
        return 2
    try:
        options = load_options()
    except (ValueError, OSError) as error:
        emit({"ok": False, "setup": True, "error": str(error)})
        return 2
    result, code = run(client_module, options)
    emit(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
