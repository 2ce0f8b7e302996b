// Differential-test oracle: evaluates flagd flag documents with the reference
// JavaScript implementation, @openfeature/flagd-core (pinned in package.json).
//
// Usage:  node evaluate.mjs < input.json > output.json
//
// Input (one JSON document on stdin), preferred shape:
//   {
//     "interpreter": false,          // optional: true = FlagdCore option
//                                    //   disableDynamicCodeGeneration (json-logic-engine
//                                    //   .run() instead of the default compiled .build())
//     "debug": false,                // optional: attach flagd-core's log lines to each result
//     "documents": [
//       {
//         "flags_doc": { ...flagd flag-definition document... },  // object, or a JSON *string*
//                                                                  // (passed to setConfigurations verbatim)
//         "now": 1700000000,         // optional unix seconds for $flagd.timestamp (doc default)
//         "evaluations": [
//           { "flag_key": "my-flag",
//             "context": { "targetingKey": "user-1", ... },   // optional, default {}
//             "now": 1700000000,     // optional, overrides the document's "now"
//             "type": "boolean",     // optional: "boolean"|"string"|"number"|"object" -> call the
//                                    //   real typed FlagdCore.resolve*Evaluation (TYPE_MISMATCH possible)
//             "default_value": false // optional, only returned for typed calls / errors (default null)
//           },
//           { "resolve_all": true, "context": {...} }  // optional: FlagdCore.resolveAll(context)
//         ]
//       }
//     ]
//   }
// Output: { "results": [[<result>, ...], ...], "load_errors": [null | "message", ...] }
//   <result> = { "value", "variant", "reason", "error_code", "error_message", "flag_metadata" }
//   (absent fields are null). For a resolve_all evaluation the result is
//   { "all": [ { "flag_key", "value", "variant", "reason", "flag_metadata" }, ... ] }.
//   If setConfigurations throws for a document, its load_errors entry is the message and every
//   evaluation of that document yields reason ERROR / error_code PARSE_ERROR.
//
// Also accepted (legacy, one document per case):
//   { "cases": [ { "flags": {...doc...}, "flag_key": "...", "context": {...}, "now": 123 } ] }
//   -> { "results": [<result>, ...] }  (flat, one result per case)
//
// Generic (untyped) evaluation: FlagdCore.resolve(type, ...) only adds a
// `typeof value !== type` check on top of FeatureFlag.evaluate(). Without "type" we
// reproduce resolve() exactly minus that check: FLAG_NOT_FOUND and DISABLED go through
// the real FlagdCore.resolve() (they return before the type check), and enabled flags
// go through the real FeatureFlag.evaluate(ctx, logger), whose value-less results
// (errors, DEFAULT without defaultVariant) get value = default_value (null).
//
// $flagd.timestamp: flagd-core computes Math.floor(Date.now() / 1000) inside
// Targeting.evaluate and has no option to inject it, so when "now" is given we stub
// Date.now() to return now * 1000 for the duration of that evaluation.

import { FlagdCore } from '@openfeature/flagd-core';

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on('data', (c) => chunks.push(c));
    process.stdin.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    process.stdin.on('error', reject);
  });
}

class CollectingLogger {
  constructor() {
    this.lines = [];
  }
  _log(level, args) {
    const text = args
      .map((a) => (typeof a === 'string' ? a : a instanceof Error ? a.message : safeJson(a)))
      .join(' ')
      .replace(/\s*\n\s*/g, ' '); // flagd-core pretty-prints schema errors; keep one line
    this.lines.push(`${level}: ${text}`);
  }
  error(...a) { this._log('error', a); }
  warn(...a) { this._log('warn', a); }
  info(...a) { this._log('info', a); }
  debug(...a) { this._log('debug', a); }
  take() {
    const l = this.lines;
    this.lines = [];
    return l;
  }
}

function safeJson(v) {
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

const realDateNow = Date.now;
function withNow(now, fn) {
  if (now === undefined || now === null) return fn();
  Date.now = () => Number(now) * 1000;
  try {
    return fn();
  } finally {
    Date.now = realDateNow;
  }
}

function orNull(v) {
  return v === undefined ? null : v;
}

function shape(res) {
  return {
    value: orNull(res.value),
    variant: orNull(res.variant),
    reason: orNull(res.reason),
    error_code: orNull(res.errorCode),
    error_message: orNull(res.errorMessage),
    flag_metadata: orNull(res.flagMetadata),
  };
}

function errorResult(code, message) {
  return {
    value: null,
    variant: null,
    reason: 'ERROR',
    error_code: code,
    error_message: message,
    flag_metadata: null,
  };
}

function describeError(e) {
  if (!e) return String(e);
  let msg = e.message !== undefined ? e.message : typeof e === 'object' ? safeJson(e) : String(e);
  if (e.cause) msg += ` (cause: ${describeError(e.cause)})`;
  return msg;
}

function evaluateOne(core, ev, docNow, logger) {
  const ctx = ev.context ?? {};
  const now = ev.now ?? docNow;
  const defaultValue = ev.default_value ?? null;
  return withNow(now, () => {
    if (ev.resolve_all) {
      const all = core.resolveAll(ctx, logger).map((r) => ({
        flag_key: r.flagKey,
        value: orNull(r.value),
        variant: orNull(r.variant),
        reason: orNull(r.reason),
        flag_metadata: orNull(r.flagMetadata),
      }));
      return { all };
    }
    const key = ev.flag_key;
    if (ev.type) {
      return shape(core.resolve(ev.type, key, defaultValue, ctx, logger));
    }
    const flag = core.getFlag(key);
    if (!flag || flag.state === 'DISABLED') {
      // Both branches return before resolve()'s type check; the type argument is irrelevant.
      return shape(core.resolve('object', key, defaultValue, ctx, logger));
    }
    const res = flag.evaluate(ctx, logger);
    if (res.value === undefined) return shape({ ...res, value: defaultValue });
    return shape(res);
  });
}

function runDocument(doc, opts) {
  const logger = new CollectingLogger();
  const core = new FlagdCore(undefined, logger, {
    disableDynamicCodeGeneration: Boolean(opts.interpreter),
  });
  const evaluations = doc.evaluations ?? [];
  const text = typeof doc.flags_doc === 'string' ? doc.flags_doc : JSON.stringify(doc.flags_doc);
  let loadError = null;
  try {
    core.setConfigurations(text);
  } catch (e) {
    loadError = `${e.code ?? e.name ?? 'Error'}: ${describeError(e)}`;
  }
  const loadLogs = logger.take();
  const results = evaluations.map((ev, i) => {
    let r;
    if (loadError !== null) {
      r = errorResult('PARSE_ERROR', loadError);
    } else {
      try {
        r = evaluateOne(core, ev, doc.now, logger);
      } catch (e) {
        // flagd-core itself should never throw here; report rather than crash.
        r = errorResult(e && e.code ? e.code : 'GENERAL', `uncaught: ${describeError(e)}`);
      }
    }
    if (opts.debug) r.logs = (i === 0 ? loadLogs : []).concat(logger.take());
    return r;
  });
  return { results, loadError };
}

async function main() {
  const input = JSON.parse(await readStdin());
  const opts = { interpreter: input.interpreter, debug: input.debug || process.env.FLAGD_CORE_DEBUG === '1' };
  if (Array.isArray(input.documents)) {
    const results = [];
    const loadErrors = [];
    for (const doc of input.documents) {
      const { results: r, loadError } = runDocument(doc, opts);
      results.push(r);
      loadErrors.push(loadError);
    }
    process.stdout.write(JSON.stringify({ results, load_errors: loadErrors }) + '\n');
  } else if (Array.isArray(input.cases)) {
    const results = input.cases.map((c) => {
      const { results: r } = runDocument(
        { flags_doc: c.flags, now: c.now, evaluations: [{ flag_key: c.flag_key, context: c.context, type: c.type, default_value: c.default_value }] },
        opts,
      );
      return r[0];
    });
    process.stdout.write(JSON.stringify({ results }) + '\n');
  } else {
    throw new Error('input must have a "documents" or "cases" array');
  }
}

main().catch((e) => {
  process.stderr.write(`evaluate.mjs: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
