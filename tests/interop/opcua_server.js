// An OPC UA server built on node-opcua (code this project did not write), for tests/test_interop_opcua.py.
//
//   node opcua_server.js PORT PKI_DIR [--user NAME --password PW] [--cert CERT.der --key KEY.pem] [--t0 EPOCH_S]
//
// Namespace 1 (the server's own): Count (UInt32, 10 a second since t0, its SourceTimestamp the moment
// it counted), Temp (Double 21.5), Level (Float 12.5), Running (Boolean true), Big (Int64 2^40 + 7),
// Small (Int16 -5). Namespace 0 has the standard nodes (i=2259 ServerStatus.State: 0 Running).
// Without --cert: the None endpoint only; with it: Basic256Sha256 SignAndEncrypt only. Anonymous
// sessions unless --user is given. Prints "ready" when it listens; stops on SIGTERM.
"use strict";
const path = require("path");
const { OPCUAServer } = require("node-opcua-server");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const { Variant, VariantArrayType, DataType } = require("node-opcua-variant");
const { StatusCodes } = require("node-opcua-status-code");
const { SecurityPolicy, MessageSecurityMode } = require("node-opcua-secure-channel");
const { nodesets } = require("node-opcua-nodesets");

function arg(name) {
    const i = process.argv.indexOf(name);
    return i > 0 ? process.argv[i + 1] : undefined;
}

async function main() {
    const port = parseInt(process.argv[2], 10);
    const pki = process.argv[3];
    const user = arg("--user"), password = arg("--password"), cert = arg("--cert"), key = arg("--key");
    const t0 = parseFloat(arg("--t0") || String(Date.now() / 1000));
    const manager = (folder) => new OPCUACertificateManager({
        rootFolder: path.join(pki, folder), automaticallyAcceptUnknownCertificate: true });
    const server = new OPCUAServer({
        port,
        hostname: "127.0.0.1",
        resourcePath: "/interop",
        nodeset_filename: [nodesets.standard],
        serverCertificateManager: manager("server"),
        userCertificateManager: manager("user"),
        certificateFile: cert,
        privateKeyFile: key,
        securityPolicies: cert ? [SecurityPolicy.Basic256Sha256] : [SecurityPolicy.None],
        securityModes: cert ? [MessageSecurityMode.SignAndEncrypt] : [MessageSecurityMode.None],
        allowAnonymous: !user,
        userManager: user ? { isValidUser: (name, pw) => name === user && pw === password } : undefined,
    });
    await server.initialize();
    const ns = server.engine.addressSpace.getOwnNamespace();
    const objects = server.engine.addressSpace.rootFolder.objects;
    const fixed = {
        Temp: [DataType.Double, 21.5], Level: [DataType.Float, 12.5], Running: [DataType.Boolean, true],
        Big: [DataType.Int64, [256, 7]], Small: [DataType.Int16, -5],
    };
    for (const [name, [dataType, value]] of Object.entries(fixed)) {
        ns.addVariable({ organizedBy: objects, browseName: name, nodeId: `s=${name}`, dataType,
                         value: new Variant({ dataType, arrayType: VariantArrayType.Scalar, value }) });
    }
    const count = ns.addVariable({ organizedBy: objects, browseName: "Count", nodeId: "s=Count",
                                   dataType: DataType.UInt32 });
    const tick = () => {  // the PLC's counter: 10 a second since t0, whether or not this server runs
        const n = Math.floor((Date.now() / 1000 - t0) * 10);
        count.setValueFromSource(new Variant({ dataType: DataType.UInt32, value: n }), StatusCodes.Good,
                                 new Date(Math.round((t0 + n / 10) * 1000)));
    };
    tick();
    const timer = setInterval(tick, 20);
    await server.start();
    process.stdout.write("ready\n");
    const stop = async () => {
        clearInterval(timer);
        await server.shutdown(0);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((err) => { console.error(err); process.exit(1); });
