// swift-tools-version:6.0
// swift-qlora: QLoRA finetuning of Llama-family models in Swift.
// Targets follow DESIGN.md: CLI -> QLoRA (umbrella) -> ... -> {Kernels, Formats} -> Core.
import PackageDescription

let package = Package(
    name: "swift-qlora",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "QLoRA", targets: ["QLoRA"]),
        .executable(name: "qlora", targets: ["qlora"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
    ],
    targets: [
        // OpenBLAS on Linux (Debian: libopenblas-dev); Accelerate is used instead on Apple platforms.
        .systemLibrary(
            name: "CBLAS",
            path: "Sources/CBLAS",
            providers: [.apt(["libopenblas-dev"])]
        ),
        // Hot loops only: scalar references beside AVX2 / AVX-512 variants picked at run time.
        .target(name: "CKernels", path: "Sources/CKernels"),
        .target(name: "QLoRACore", dependencies: [.product(name: "Atomics", package: "swift-atomics")]),
        .target(
            name: "QLoRAKernels",
            dependencies: [
                "QLoRACore", "CKernels",
                .target(name: "CBLAS", condition: .when(platforms: [.linux])),
            ]
        ),
        .target(name: "QLoRAFormats", dependencies: ["QLoRACore"]),
        .target(name: "QLoRATokenizer", dependencies: ["QLoRACore", "QLoRAFormats"]),
        .target(name: "QLoRAModel", dependencies: ["QLoRACore", "QLoRAKernels", "QLoRAFormats"]),
        .target(name: "QLoRAGeneration", dependencies: ["QLoRACore", "QLoRAModel", "QLoRATokenizer"]),
        .target(name: "QLoRAEvaluation", dependencies: ["QLoRACore", "QLoRAModel", "QLoRATokenizer", "QLoRAGeneration"]),
        // The OpenAI chat protocol as a client speaks it (the judge's endpoint), over AsyncHTTPClient; messages are QLoRATokenizer's ChatMessage.
        .target(
            name: "QLoRAOpenAI",
            dependencies: [
                "QLoRACore", "QLoRATokenizer", .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // `qlora merge`: merged models as Hugging Face folders or GGUF files, tokenizers carried across formats.
        .target(name: "QLoRAExport", dependencies: ["QLoRACore", "QLoRAFormats", "QLoRAKernels", "QLoRAModel", "QLoRATokenizer"]),
        .target(name: "QLoRATraining", dependencies: ["QLoRACore", "QLoRAKernels", "QLoRAFormats", "QLoRATokenizer", "QLoRAModel"]),
        // `qlora serve`: the OpenAI endpoints on Hummingbird 2 over a continuous-batching engine.
        .target(
            name: "QLoRAServer",
            dependencies: [
                "QLoRACore", "QLoRAModel", "QLoRATokenizer", "QLoRAGeneration",
                .product(name: "Hummingbird", package: "hummingbird"), .product(name: "Logging", package: "swift-log"),
                .product(name: "HTTPTypes", package: "swift-http-types"), .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        // `--config FILE`: YAML options files.
        .target(name: "QLoRAConfig", dependencies: ["QLoRACore", .product(name: "Yams", package: "Yams")]),
        .target(name: "QLoRA", dependencies: ["QLoRACore", "QLoRAKernels", "QLoRAFormats", "QLoRATokenizer", "QLoRAModel", "QLoRAGeneration", "QLoRAEvaluation", "QLoRATraining", "QLoRAExport"]),
        .executableTarget(
            name: "qlora",
            dependencies: [
                "QLoRA", "QLoRAOpenAI", "QLoRAServer", "QLoRAConfig", .product(name: "ArgumentParser", package: "swift-argument-parser"), .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "qlora-bench",
            dependencies: [
                "QLoRA", "CAllocationCounter", .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            path: "bench/Sources/qlora-bench"
        ),
        // libFuzzer targets over every parser of hostile input (`make fuzz`; a separate, sanitized build).
        .executableTarget(
            name: "qlora-fuzz",
            dependencies: ["QLoRACore", "QLoRAConfig", "QLoRAEvaluation", "QLoRAFormats", "QLoRAModel", "QLoRAServer", "QLoRATokenizer", "QLoRATraining"],
            path: "fuzz/Sources/qlora-fuzz"
        ),
        // The library used from Swift, as README shows it: load, train a few steps, save the adapter, chat (built by make test).
        .executableTarget(name: "train-and-generate", dependencies: ["QLoRA"], path: "Examples/TrainAndGenerate"),
        // The bench binary's malloc counter (a measuring instrument; not part of the library or CLI).
        .target(name: "CAllocationCounter", path: "bench/Sources/CAllocationCounter"),
        // Fixtures are read from Tests/<Target>/Resources through #filePath (the source tree), not bundled.
        .target(name: "QLoRATestSupport", dependencies: ["QLoRACore", "QLoRAFormats"], path: "Tests/Support"),
        .testTarget(name: "QLoRACoreTests", dependencies: ["QLoRACore", "QLoRATestSupport"], exclude: ["Resources"]),
        .testTarget(name: "QLoRAKernelsTests", dependencies: ["QLoRAKernels", "QLoRAFormats", "QLoRATestSupport"], exclude: ["Resources"]),
        .testTarget(name: "QLoRAFormatsTests", dependencies: ["QLoRA", "QLoRATestSupport"], exclude: ["Resources"]),
        .testTarget(name: "QLoRATokenizerTests", dependencies: ["QLoRA", "QLoRATestSupport"], exclude: ["Resources"]),
        .testTarget(name: "QLoRAEvaluationTests", dependencies: ["QLoRA", "QLoRATestSupport"], exclude: ["Resources"]),
        .testTarget(name: "QLoRATrainingTests", dependencies: ["QLoRA", "QLoRATestSupport"], exclude: ["Resources"]),
        .testTarget(name: "QLoRAModelTests", dependencies: ["QLoRA", "QLoRATestSupport"], exclude: ["Resources"]),
        .testTarget(
            name: "QLoRACLITests",
            dependencies: [
                "QLoRA", "QLoRAServer", "QLoRATestSupport", "qlora", "qlora-bench", .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"), .product(name: "Logging", package: "swift-log"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
            ]
        ),
    ],
    swiftLanguageModes: [.v5]
)
