// Compiles contracts/src with solc from the npm registry and writes one artifact
// per contract (ABI + creation and runtime bytecode) to contracts/artifacts/.
// The Rust crate `gpupool-chain` reads those artifacts with alloy's `sol!`, and
// `make check-generated` fails when a fresh compile differs from what is committed.
import { readFileSync, writeFileSync, mkdirSync, readdirSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const solc = require("solc");
const here = dirname(fileURLToPath(import.meta.url));

// Settings are part of the artifact's identity: changing them changes bytecode.
const settings = {
  // Cancun: transient storage for the reentrancy guard; every current EVM chain has it.
  evmVersion: "cancun",
  // Tuned for the calls every lease makes, not for deployment, which happens once:
  // the IR pipeline with a high run count took a whole lease from 152.8k to 147.3k
  // gas for an agent and from 145.7k to 140.8k for a renter (`make bench`,
  // bench-escrow), for 10 KiB of runtime code (the limit is 24 KiB).
  optimizer: { enabled: true, runs: 1000000 },
  viaIR: true,
  // No metadata hash: it embeds absolute-path-free but environment-sensitive data;
  // leaving it out keeps the bytecode byte-for-byte reproducible.
  metadata: { bytecodeHash: "none", appendCBOR: false },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

const contracts = ["GpuToken", "LeaseEscrow"];
const sources = {};
for (const name of readdirSync(join(here, "src")).sort()) {
  if (name.endsWith(".sol")) sources[`src/${name}`] = { content: readFileSync(join(here, "src", name), "utf8") };
}

function findImports(path) {
  const candidate = join(here, "node_modules", path);
  if (existsSync(candidate)) return { contents: readFileSync(candidate, "utf8") };
  return { error: `import not found: ${path} (run 'npm ci' in contracts/)` };
}

const output = JSON.parse(
  solc.compile(JSON.stringify({ language: "Solidity", sources, settings }), { import: findImports }),
);
// Our own sources must compile without warnings; OpenZeppelin's (e.g. its note on
// transient storage, which its reentrancy guard uses safely) are not ours to fix.
const ours = (e) => e.sourceLocation?.file?.startsWith("src/") ?? true;
const errors = (output.errors ?? []).filter((e) => e.severity === "error" || ours(e));
for (const e of errors) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);

mkdirSync(join(here, "artifacts"), { recursive: true });
for (const name of contracts) {
  const compiled = output.contracts[`src/${name}.sol`]?.[name];
  if (!compiled) {
    console.error(`contract ${name} missing from solc output`);
    process.exit(1);
  }
  const artifact = {
    contractName: name,
    compiler: { name: "solc", version: solc.version(), settings: { evmVersion: settings.evmVersion, optimizer: settings.optimizer, viaIR: settings.viaIR } },
    abi: compiled.abi,
    bytecode: "0x" + compiled.evm.bytecode.object,
    deployedBytecode: "0x" + compiled.evm.deployedBytecode.object,
  };
  writeFileSync(join(here, "artifacts", `${name}.json`), JSON.stringify(artifact, null, 2) + "\n");
  console.log(`contracts/artifacts/${name}.json: ${compiled.evm.deployedBytecode.object.length / 2} bytes of runtime code`);
}
