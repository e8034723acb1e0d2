// swift-tools-version: 6.0
// kvstore: a KV-cache object store for LLM serving. Layers and rules: docs/architecture.md.
import PackageDescription

let package = Package(
    name: "kvstore",
    products: [
        // The CPython extension. setup.py copies lib_native.so to kvstore/_native.abi3.so.
        .library(name: "_native", type: .dynamic, targets: ["CKVStorePython"]),
        .library(name: "KVStore", targets: ["KVStore"]),
        .executable(name: "kvstore-master", targets: ["kvstore-master"])
    ],
    dependencies: [],
    targets: [
        .target(name: "KVCore"),
        // The system layer: libc calls with one error and retry policy, sockets (credentials and
        // descriptor passing), the frame reader, threads, the clock, token files, the etcd client.
        .target(name: "KVSystem", dependencies: ["KVCore", "CKVCopy"]),
        // C copy kernels (SIMD streaming stores) used by KVTransfer's local transport.
        .target(name: "CKVCopy", cSettings: [.unsafeFlags(["-O2"])]),
        // Finds the linker section of device registration records (see AcceleratorRegistration).
        .target(name: "CKVAccelerator"),
        .target(name: "KVAccelerator", dependencies: ["KVCore", "KVSystem", "CKVAccelerator"]),
        // RDMA over libibverbs, loaded with dlopen (verbs structures from libibverbs-dev's header).
        .target(name: "CKVVerbs", cSettings: [.unsafeFlags(["-O2"])]),
        .target(name: "KVTransfer", dependencies: ["KVCore", "KVSystem", "KVAccelerator", "CKVCopy", "CKVVerbs"]),
        .target(name: "KVStore", dependencies: ["KVCore", "KVSystem", "KVAccelerator", "KVTransfer", "CKVCopy"]),
        // The network master: MasterService (KVCore) behind a poll loop, plus /metrics and /health.
        .target(name: "KVMaster", dependencies: ["KVCore", "KVSystem"]),
        // Its command line is KVMaster.MasterCommandLine, shared with `kvstore master`.
        .executableTarget(name: "kvstore-master", dependencies: ["KVMaster"]),
        // Header-only C target: the flat C ABI's types and prototypes (ownership rules live there).
        .target(name: "CKVStoreABI", dependencies: ["CKVAccelerator"]),
        .target(name: "KVStoreABI", dependencies: ["CKVStoreABI", "KVStore", "KVCore", "KVSystem", "KVAccelerator", "KVTransfer", "KVMaster"]),
        .systemLibrary(name: "CPython", path: "Sources/CPython", pkgConfig: "python3"),
        .target(
            name: "CKVStorePython",
            dependencies: ["CKVStoreABI", "KVStoreABI", "CPython"],
            cSettings: [
                .define("Py_LIMITED_API", to: "0x030B0000"),
                .unsafeFlags(["-O2", "-fvisibility=hidden"])
            ],
            linkerSettings: [
                .unsafeFlags([
                    "-static-stdlib",
                    "-Xlinker", "--version-script=Sources/CKVStorePython/exports.map"
                ])
            ]
        ),
        // Helpers shared by the test targets (seeded random numbers).
        .target(name: "KVTestSupport", dependencies: ["KVAccelerator", "KVCore", "KVSystem"], path: "Tests/KVTestSupport"),
        .testTarget(name: "KVCoreTests", dependencies: ["KVCore", "KVTestSupport", "CKVStoreABI"]),
        .testTarget(name: "KVAcceleratorTests", dependencies: ["KVAccelerator", "KVCore", "KVTestSupport"]),
        .testTarget(name: "KVTransferTests", dependencies: ["KVTransfer", "KVSystem", "KVAccelerator", "KVCore"]),
        .testTarget(name: "KVStoreTests", dependencies: ["KVStore", "KVCore", "KVSystem", "KVAccelerator", "KVTransfer", "KVTestSupport"]),
        .testTarget(
            name: "KVMasterTests", dependencies: ["KVMaster", "KVCore", "KVSystem", "KVAccelerator", "KVTransfer", "KVStore", "KVStoreABI", "KVTestSupport"])
    ]
)
