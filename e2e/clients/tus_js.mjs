// Uploads one file to a tus server with tus-js-client, as a Node.js program would, for the
// end-to-end tests (e2e/tests/e2e/tus_clients.rs).
//
//   node tus_js.mjs '<options as JSON>'      (or the path of a JSON file)
//
// Options:
//   endpoint        the creation URL (`http://127.0.0.1:PORT/files/`)
//   file            the path of the file to upload
//   source          "file" (default: a file stream, so no chunkSize is needed), "stream" (a
//                   plain readable stream: tus-js-client then needs chunkSize), "buffer", or
//                   "stalling" (PATCH bodies that give the file up to stallAfterBytes and
//                   then wait, aborted stopDelayMs later: a PATCH cut off at an exact byte,
//                   as when a client loses its network)
//   chunkSize       bytes per PATCH (default: the whole rest of the file in one)
//   parallelUploads partial uploads sent at once, then one final concatenation
//   headers         sent with every request (e.g. Authorization)
//   metadata        Upload-Metadata ({filename, filetype})
//   uploadUrl       resume this upload instead of creating one
//   urlStorage      a file where the client keeps upload URLs by the file's fingerprint
//   resume          with urlStorage: resume the upload stored for this file, if any
//   stopAfterBytes  abort once this many bytes are sent (stopOn "progress", the default: in
//                   the middle of a PATCH, but progress events are throttled, so later than
//                   that) or accepted (stopOn "chunk": between two PATCHes, before the
//                   next one starts unless stopDelayMs is given), stopDelayMs later
//                   (default 0)
//   retryDelays     tus-js-client's retries (default none, so failures show)
//   uploadDataDuringCreation, uploadLengthDeferred, uploadSize   passed on (a "stream"
//                   source's uploadSize is the file's unless the length is deferred)
//
// Output: JSON lines on stdout: {"event":"url"|"chunk"|...} as things happen, then one final
// {"ok":true,"url":...,"bytesUploaded":...,"requests":[...]} (with "stopped":true when
// stopAfterBytes stopped it) or {"ok":false,"error":...,"status":...,"body":...,"url":...}.
// Exit status: 0 on success or a deliberate stop, 1 when the upload failed, 2 when the client
// could not run at all (tus-js-client not installed, bad options).
//
// tus-js-client is looked up in STITCH_TEST_NODE_MODULES (where `cargo xtask test` installs
// it), else beside this file.

import { createReadStream, readFileSync, statSync } from 'node:fs'
import { createRequire } from 'node:module'
import path from 'node:path'
import { PassThrough } from 'node:stream'

function emit(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`)
}

// Writes the final line, then exits once it is flushed.
function finish(line, code) {
  process.stdout.write(`${JSON.stringify(line)}\n`, () => process.exit(code))
}

function loadTus() {
  const modules = process.env.STITCH_TEST_NODE_MODULES
  const from = modules ? path.join(path.dirname(modules), 'package.json') : import.meta.url
  try {
    return createRequire(from)('tus-js-client')
  } catch (e) {
    finish(
      {
        ok: false,
        setup: true,
        error:
          `tus-js-client cannot be loaded (${e.message}); ` +
          '`cargo xtask test` installs it and sets STITCH_TEST_NODE_MODULES',
      },
      2,
    )
    return null
  }
}

function loadOptions() {
  const arg = process.argv[2]
  if (!arg) {
    throw new Error('usage: node tus_js.mjs <options as JSON, or a JSON file>')
  }
  return JSON.parse(arg.trimStart().startsWith('{') ? arg : readFileSync(arg, 'utf8'))
}

function openSource(options) {
  switch (options.source ?? 'file') {
    case 'file':
      return createReadStream(options.file)
    case 'stream':
      // A stream that is not a file's: tus-js-client cannot slice it, so it reads it once.
      return createReadStream(options.file).pipe(new PassThrough())
    case 'buffer':
      return readFileSync(options.file)
    case 'stalling':
      // Read by stallingFileReader.
      return options.file
    default:
      throw new Error(`unknown source ${options.source}`)
  }
}

// A source (tus-js-client's `fileReader` option) whose PATCH bodies give the file's bytes up
// to `stallAt` and then nothing more, without ending: the request waits, as one whose network
// went away, until it is aborted.
function stallingFileReader(file, stallAt, onStall) {
  return {
    openFile() {
      const size = statSync(file).size
      return Promise.resolve({
        size,
        slice(start, end) {
          const body = new PassThrough()
          const until = Math.min(end, stallAt)
          if (until > start) {
            const read = createReadStream(file, { start, end: until - 1 })
            read.pipe(body, { end: false })
            if (until < end) read.on('end', onStall)
          }
          // The length the request declares: the whole slice.
          body.size = end - start
          return Promise.resolve({ value: body, done: end >= size })
        },
        close() {},
      })
    },
  }
}

// The response headers a failure report shows (Node's response cannot list them all).
const REPORTED_HEADERS = [
  'tus-resumable',
  'tus-version',
  'tus-extension',
  'upload-offset',
  'upload-length',
  'location',
  'content-type',
  'www-authenticate',
  'retry-after',
]

function describeResponse(res) {
  if (!res) return {}
  const headers = {}
  for (const name of REPORTED_HEADERS) {
    const value = res.getHeader(name)
    if (value != null) headers[name] = value
  }
  return { status: res.getStatus(), headers, body: res.getBody() }
}

function run(tus, options) {
  const requests = []
  // Each request's entry in `requests`, to add its response to.
  const entries = new WeakMap()
  let bytesSent = 0
  let bytesAccepted = 0
  let stopped = false
  let upload = null

  const stopAt = options.stopAfterBytes
  const stopOn = options.stopOn ?? 'progress'
  const stop = () => {
    stopped = true
    if (stopOn === 'chunk' && options.stopDelayMs == null) {
      // At once, inside onChunkComplete: tus-js-client then sends no next PATCH. From a
      // timer, the next PATCH may already be on its way, and its first bytes reach the
      // server (which keeps them: the offset is then past what this client saw accepted).
      abort()
    } else {
      setTimeout(abort, options.stopDelayMs ?? 0)
    }
  }
  const abort = () => {
    upload.abort().then(
      () =>
        finish(
          {
            ok: true,
            stopped: true,
            url: upload.url,
            parallelUploadUrls: upload._parallelUploadUrls ?? null,
            bytesSent,
            bytesUploaded: bytesAccepted,
            requests,
          },
          0,
        ),
      (e) => finish({ ok: false, error: `abort failed: ${e.message}`, url: upload.url }, 1),
    )
  }

  const tusOptions = {
    endpoint: options.endpoint ?? null,
    uploadUrl: options.uploadUrl ?? null,
    headers: options.headers ?? {},
    metadata: options.metadata ?? {},
    retryDelays: options.retryDelays ?? [],
    parallelUploads: options.parallelUploads ?? 1,
    uploadDataDuringCreation: options.uploadDataDuringCreation ?? false,
    uploadLengthDeferred: options.uploadLengthDeferred ?? false,
    storeFingerprintForResuming: Boolean(options.urlStorage),
    removeFingerprintOnSuccess: false,
    onBeforeRequest(req) {
      const entry = {
        method: req.getMethod(),
        url: req.getURL(),
        offset: req.getHeader('Upload-Offset') ?? null,
        concat: req.getHeader('Upload-Concat') ?? null,
      }
      entries.set(req, entry)
      requests.push(entry)
    },
    onAfterResponse(req, res) {
      const entry = entries.get(req)
      if (entry) {
        entry.status = res.getStatus()
        entry.responseOffset = res.getHeader('Upload-Offset') ?? null
        entry.location = res.getHeader('Location') ?? null
      }
    },
    onUploadUrlAvailable() {
      emit({ event: 'url', url: upload.url })
    },
    onProgress(sent) {
      bytesSent = sent
      if (stopAt != null && stopOn === 'progress' && !stopped && sent >= stopAt) stop()
    },
    onChunkComplete(chunkSize, accepted, total) {
      bytesAccepted = accepted
      emit({ event: 'chunk', chunkSize, bytesAccepted: accepted, bytesTotal: total })
      if (stopAt != null && stopOn === 'chunk' && !stopped && accepted >= stopAt) stop()
    },
    onSuccess() {
      if (stopped) return
      finish(
        {
          ok: true,
          url: upload.url,
          bytesUploaded: upload._size,
          bytesSent,
          requests,
        },
        0,
      )
    },
    onError(err) {
      if (stopped) return
      finish(
        {
          ok: false,
          error: err.message,
          url: upload?.url ?? null,
          method: err.originalRequest?.getMethod() ?? null,
          requestUrl: err.originalRequest?.getURL() ?? null,
          ...describeResponse(err.originalResponse),
          bytesUploaded: bytesAccepted,
          requests,
        },
        1,
      )
    },
  }
  if (options.chunkSize != null) tusOptions.chunkSize = options.chunkSize
  if (options.uploadSize != null) {
    tusOptions.uploadSize = options.uploadSize
  } else if (options.source === 'stream' && !tusOptions.uploadLengthDeferred) {
    // A plain stream has no size; an application that knows it says so.
    tusOptions.uploadSize = statSync(options.file).size
  }
  if (options.source === 'stalling') {
    // Stopped once the bytes before the stall are on their way (progress events are
    // throttled: the last ones before a stall may never come).
    tusOptions.fileReader = stallingFileReader(options.file, options.stallAfterBytes, () => {
      if (!stopped) stop()
    })
  }
  if (options.urlStorage) tusOptions.urlStorage = new tus.FileUrlStorage(options.urlStorage)

  upload = new tus.Upload(openSource(options), tusOptions)
  if (options.resume && options.urlStorage) {
    upload.findPreviousUploads().then(
      (previous) => {
        if (previous.length > 0) {
          // The most recent one, as an application resuming its last attempt would.
          previous.sort((a, b) => Date.parse(b.creationTime) - Date.parse(a.creationTime))
          emit({
            event: 'resuming',
            url: previous[0].uploadUrl ?? null,
            parallelUploadUrls: previous[0].parallelUploadUrls ?? null,
          })
          upload.resumeFromPreviousUpload(previous[0])
        } else {
          emit({ event: 'nothing to resume' })
        }
        upload.start()
      },
      (e) => finish({ ok: false, error: `reading the URL storage: ${e.message}` }, 1),
    )
  } else {
    upload.start()
  }
}

const tus = loadTus()
if (tus) {
  let options
  try {
    options = loadOptions()
  } catch (e) {
    finish({ ok: false, setup: true, error: e.message }, 2)
  }
  if (options) {
    process.on('uncaughtException', (e) =>
      finish({ ok: false, error: `uncaught: ${e.stack}` }, 1),
    )
    run(tus, options)
  }
}
