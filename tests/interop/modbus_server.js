// A Modbus slave built on npm modbus-serial (code this project did not write), for tests/test_interop_modbus.py.
//
//   node modbus_server.js MAP.json tcp PORT           Modbus TCP on 127.0.0.1:PORT
//   node modbus_server.js MAP.json rtu DEVICE BAUD    Modbus RTU, 8N1, on a serial device (one end of a socat pty pair:
//                                                    Linux pseudo-terminals refuse parity settings)
//
// MAP.json: [{table, address, type, word_order, byte_order, value}, ...]. Each value is written with
// Node's own Buffer encoders (writeUInt16BE, writeInt32BE, writeFloatBE, writeDoubleBE, ...), big-endian,
// then its 16-bit words are reversed for word_order "little" and the two bytes of each word swapped for
// byte_order "little". Coils and discrete inputs hold `value` (true/false). Every unit id answers.
// Prints "ready" when it serves; stops on SIGTERM.
"use strict";
const fs = require("fs");
const ModbusRTU = require("modbus-serial");

const WRITERS = {
    uint16: [2, (b, v) => b.writeUInt16BE(v)], int16: [2, (b, v) => b.writeInt16BE(v)],
    uint32: [4, (b, v) => b.writeUInt32BE(v)], int32: [4, (b, v) => b.writeInt32BE(v)],
    float32: [4, (b, v) => b.writeFloatBE(v)], float64: [8, (b, v) => b.writeDoubleBE(v)],
};

function words(entry) {
    const [size, write] = WRITERS[entry.type];
    const buf = Buffer.alloc(size);
    write(buf, entry.value);
    let out = [];
    for (let i = 0; i < size; i += 2) {
        out.push(entry.byte_order === "little" ? buf.readUInt16LE(i) : buf.readUInt16BE(i));
    }
    if (entry.word_order === "little") out = out.reverse();
    return out;
}

const map = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const registers = { holding: new Map(), input: new Map() };
const bits = { coil: new Map(), discrete: new Map() };
for (const entry of map) {
    if (entry.table in bits) {
        bits[entry.table].set(entry.address, Boolean(entry.value));
    } else {
        words(entry).forEach((w, i) => registers[entry.table].set(entry.address + i, w));
    }
}
const vector = {
    getHoldingRegister: (addr) => registers.holding.get(addr) || 0,
    getInputRegister: (addr) => registers.input.get(addr) || 0,
    getCoil: (addr) => bits.coil.get(addr) || false,
    getDiscreteInput: (addr) => bits.discrete.get(addr) || false,
};

const kind = process.argv[3];
let server;
if (kind === "tcp") {
    server = new ModbusRTU.ServerTCP(vector, { host: "127.0.0.1", port: parseInt(process.argv[4], 10), unitID: 255 });
} else {
    server = new ModbusRTU.ServerSerial(vector, { path: process.argv[4], baudRate: parseInt(process.argv[5], 10),
                                                  parity: "none", unitID: 255 });
}
server.on("error", (err) => { console.error("server error", err); });
server.on("initialized", () => process.stdout.write("ready\n"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
