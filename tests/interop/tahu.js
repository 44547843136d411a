// Eclipse Tahu's own JavaScript codec (npm sparkplug-payload) as a Sparkplug host would use it, for
// tests/test_sparkplug_interop.py. One JSON request per stdin line, one JSON answer per stdout line:
//   {"op": "decode", "topic": T, "b64": B}  -> the payload as Tahu decodes it (64-bit numbers as strings)
//   {"op": "encode", "payload": P}          -> {"b64": ...} encoded by Tahu (e.g. a rebirth NCMD)
// Like a host built on Tahu, it remembers each metric's datatype from the births (NBIRTH, DBIRTH),
// since data messages carry aliases without datatypes (tck-id-payloads-metric-datatype-not-req).
"use strict";
const readline = require("readline");
const Long = require("long");
// As a host installs it (npm dedupes long@4 under sparkplug-payload and its protobufjs): one Long class, so that
// Tahu's `instanceof Long` conversions run. Here another package's long@5 keeps two copies of long@4, and without
// this every 64-bit value reached Tahu's decoder as a Long it did not recognise: Int64 -1 as 18446744073709551615,
// and UInt32 past 2^31 unsigned where Tahu 1.0.3 reads it signed (`toInt()`).
const tahuDir = require("path").dirname(require.resolve("sparkplug-payload/package.json"));
const protobuf = require(require.resolve("protobufjs", { paths: [tahuDir] }));
protobuf.util.Long = require(require.resolve("long", { paths: [tahuDir] }));
protobuf.configure();
const sparkplug = require("sparkplug-payload").get("spBv1.0");
const Payload = require("sparkplug-payload/lib/sparkplugPayloadProto").org.eclipse.tahu.protobuf.Payload;

const datatypes = new Map(); // alias -> datatype, from the births of this edge node's session

function decode(topic, bytes) {
    const kind = topic.split("/")[2];
    const raw = Payload.decode(bytes);
    if (kind === "NBIRTH") datatypes.clear();
    for (const m of raw.metrics) {
        const alias = Long.isLong(m.alias) ? m.alias.toNumber() : m.alias;
        if (kind.endsWith("BIRTH") && m.datatype && alias !== undefined && alias !== null) datatypes.set(alias, m.datatype);
        if (!m.datatype && datatypes.has(alias)) m.datatype = datatypes.get(alias);
    }
    sparkplug.decodePayload(bytes); // the bytes as sent must decode too
    return sparkplug.decodePayload(Payload.encode(raw).finish());
}

function plain(key, value) {
    if (Long.isLong(value)) return value.toString();
    if (value instanceof Uint8Array) return Buffer.from(value).toString("base64");
    return value;
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
    let answer;
    try {
        const req = JSON.parse(line);
        if (req.op === "decode") {
            answer = { payload: decode(req.topic, Buffer.from(req.b64, "base64")) };
        } else if (req.op === "encode") {
            answer = { b64: Buffer.from(sparkplug.encodePayload(req.payload)).toString("base64") };
        } else {
            answer = { error: `unknown op ${req.op}` };
        }
    } catch (err) {
        answer = { error: String(err && err.stack || err) };
    }
    process.stdout.write(JSON.stringify(answer, plain) + "\n");
});
