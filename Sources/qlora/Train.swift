import ArgumentParser
import QLoRA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Finetune a model with QLoRA: frozen 4-bit base, LoRA adapters on every linear layer.",
        discussion: """
            DATA is JSON or JSONL in alpaca (instruction/input/output), messages (role/content), sharegpt \
            (conversations with from/value), prompt/completion or text format (detected, or --format). Conversations are \
            rendered with the model's chat template (--template guanaco for the paper's "### Human: ... ### Assistant:") and \
            only the responses are trained on, unless --train-on-inputs. The defaults are the QLoRA paper's (r 64, alpha 16, \
            dropout 0.1, lr 2e-4 constant, max grad norm 0.3, paged AdamW, an effective batch of 16 as 4 x 4 accumulation). \
            OUTPUT receives the final PEFT adapter (adapter_config.json, adapter_model.safetensors), checkpoint-N/ folders, \
            metrics.jsonl, TensorBoard event files in tensorboard/ (tensorboard --logdir OUTPUT) and training_args.yaml \
            (this run's options, usable as --config). Ctrl-C (or SIGTERM) saves a checkpoint and stops; --resume continues from the latest one.
            """
    )

    @Option(help: "A YAML file of these options (lora_r: 16, learning_rate: 1e-4, ...); flags given here override it.")
    var config: String?

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Training data: a .json or .jsonl file.")
    var data: String

    @Option(help: "Validation data (default: --val-split of the training data).")
    var valData: String?

    @Option(help: "Fraction of the training data held out for validation when --val-data is not given.")
    var valSplit: Double = 0.05

    @Option(help: "Data format: auto, alpaca, messages, sharegpt, prompt_completion, text.")
    var format: String = "auto"

    @Option(help: "Prompt format: chat (the model's chat template) or guanaco (### Human: / ### Assistant:).")
    var template: String = "chat"

    @Option(name: .shortAndLong, help: "Output folder for the adapter, checkpoints and metrics.jsonl.")
    var output: String

    @Option(help: "LoRA rank r.")
    var loraR: Int = 64
    @Option(help: "LoRA alpha (the update is scaled by alpha / r).")
    var loraAlpha: Float = 16
    @Option(help: "Dropout on the LoRA input.")
    var loraDropout: Float = 0.1
    @Option(help: "Projections to adapt, comma-separated as PEFT names them (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; Phi-3: qkv_proj,o_proj,gate_up_proj,down_proj) or all.")
    var targetModules: String = "all"
    @Flag(help: "Scale the update by alpha / sqrt(r) (rsLoRA).")
    var useRslora = false
    @Flag(help: "DoRA (weight-decomposed LoRA, as PEFT's use_dora): each adapted projection also trains a magnitude per output row, W' = m (W + s BA) / |W + s BA|; written in PEFT's layout and merged by qlora merge. With --lora-dropout > 0 the frozen product of each adapted projection runs a second time on the dropped-out input (as PEFT's DoRA does).")
    var useDora = false
    @Option(name: [.customLong("lora-init"), .customLong("init-lora")], help: ArgumentHelp("LoRA initialization: kaiming (PEFT's default) or gaussian (A random, B zero: the model starts as the base), or pissa (the adapter takes the r principal singular directions of each full-precision weight and the frozen base is the residual, quantized: PiSSA, as PEFT's init_lora_weights pissa) or loftq (the base quantized and the adapter the rank-r SVD of what quantization lost, --loftq-iter rounds: LoftQ, as PEFT's LoftQConfig, with s BA rather than BA equal to the fit). pissa and loftq read the model's full-precision weights (a GGUF's as stored, dequantized; not a bitsandbytes checkpoint, which has none); when the base differs from the model's own quantization (pissa; loftq after more than one round), it is written to OUTPUT/base (a bitsandbytes 4-bit folder; f32 with --quant-type none), and the adapter names it as its base; --resume reads it back.", valueName: "init"))
    var loraInit: String = "kaiming"
    @Option(help: "LoftQ: rounds of quantize-and-SVD (PEFT's loftq_iter, default 1).")
    var loftqIter: Int = 1

    @Option(help: "Peak learning rate.")
    var learningRate: Double = 2e-4
    @Option(help: "Learning-rate schedule: constant (the paper's), cosine or linear.")
    var lrScheduler: String = "constant"
    @Option(help: "Steps of linear warm-up.")
    var warmupSteps: Int = 0
    @Option(help: "Stop after this many optimizer steps (0: train --epochs).")
    var maxSteps: Int = 0
    @Option(help: "Passes over the training data.")
    var epochs: Int = 1
    @Option(help: "Sequences per micro-batch.")
    var batchSize: Int = 4
    @Option(help: "Micro-batches per optimizer step.")
    var gradAccum: Int = 4
    @Option(help: "Clip the global gradient norm to this (0 disables).")
    var maxGradNorm: Double = 0.3
    @Option(help: "Longest sequence in tokens; longer examples are cut (responses keep their EOS).")
    var maxSeqLen: Int = 512
    @Option(help: "Keep at most this many tokens of each prompt (the paper's source_max_len; default: no limit).")
    var sourceMaxLen: Int?
    @Option(help: "Keep at most this many tokens of each response, ending in EOS (the paper's target_max_len; default: no limit).")
    var targetMaxLen: Int?
    @Option(help: "Optimizer: paged_adamw_32bit, paged_adamw_8bit, adamw_32bit, adamw_8bit.")
    var optim: String = "paged_adamw_32bit"
    @Option(help: ArgumentHelp("Precision of the frozen model's products: bf16 (operands rounded to bfloat16, sums in f32; the paper's compute dtype; 1.6x as fast as f32 on the default model with AVX512-BF16) or f32. LoRA weights, gradients and optimizer state are f32 either way. Without AVX512-BF16, bf16 falls back to f32.", valueName: "dtype"))
    var computeDtype: String = "bf16"
    @Option(help: "AdamW weight decay.")
    var weightDecay: Double = 0
    @Option(help: "Seed for LoRA initialization, dropout and data order.")
    var seed: UInt64 = 0
    @Option(help: "Compute the validation loss every N steps (0: only at the start and the end).")
    var evalEvery: Int = 0
    @Option(help: "Save a checkpoint every N steps (0: only at the end).")
    var saveEvery: Int = 0
    @Option(help: "Keep at most this many checkpoints.")
    var saveTotalLimit: Int = 3

    @Flag(help: "Continue from the latest checkpoint in OUTPUT.")
    var resume = false
    @Flag(help: "Train on the prompts too, not only on the responses.")
    var trainOnInputs = false
    @Flag(help: "Pack short training examples together into sequences of up to --max-seq-len tokens (attention stays inside each example; positions restart).")
    var packing = false
    @Flag(help: "Batch examples in random order instead of grouping similar lengths.")
    var noGroupByLength = false
    @Flag(help: "Skip malformed records (counted) instead of stopping at the first.")
    var skipBadRecords = false
    @Option(help: "Data parallelism: auto (MPI when launched by mpirun -np N, N > 1), mpi, or none. Each rank runs its share of every step's micro-batches (micro-batch i on rank i mod N) and the LoRA gradients are summed over the ranks (MPI_Allreduce), so N ranks make the same update as one process; rank 0 writes the output. Needs OpenMPI (apt-get install openmpi-bin); the ranks on one machine share its cores unless QLORA_THREADS is set.")
    var distributed: String = "auto"
    @Flag(help: "Skip a step whose loss or gradient is not finite instead of stopping.")
    var skipNonfinite = false
    @Flag(help: "Keep every activation instead of recomputing each layer in the backward pass (faster, more memory).")
    var noGradientCheckpointing = false
    @Option(help: "LoRA+: train each B matrix at this many times the learning rate of A (PEFT's loraplus_lr_ratio; the LoRA+ paper suggests 16). --weight-decay applies to both, as PEFT's loraplus_weight_decay.")
    var loraplusLrRatio: Double?

    @Option(help: "What to train for: sft (supervised: the responses of DATA) or dpo (preference pairs: DATA holds prompt/chosen/rejected, as TRL's DPOTrainer reads them, plain text or conversations; the reference is the frozen base with the adapter off, scored once and kept in OUTPUT/reference_logps.json), or orpo (the same pairs, no reference: the chosen sequences' likelihood plus beta times the odds-ratio term, as TRL's ORPOTrainer), or kto (unpaired completions: DATA holds prompt/completion/label, label true for a desirable completion, or pairs, which are unpaired as TRL does; as TRL's KTOTrainer, each row is also scored with the completion of the previous row of its block of --batch-size rows to estimate the KL term; the reference as for dpo).")
    var method = "sft"

    @Option(help: "DPO: beta, how strongly the adapter is held near the reference; ORPO: the weight of the odds-ratio term (lambda). TRL's default 0.1 for both.")
    var beta = 0.1

    @Option(help: "DPO loss: sigmoid (the DPO paper's), hinge or ipo (log-ratios averaged over tokens, as TRL).")
    var dpoLoss = "sigmoid"

    @Option(help: "KTO loss: kto (the KTO paper's, with the KL estimate) or apo_zero_unpaired (TRL's: no KL term).")
    var ktoLoss = "kto"

    @Option(help: "KTO: the weight of the desirable rows' losses (TRL's desirable_weight). With unequal counts of desirable and undesirable rows, the KTO paper keeps desirable_weight x desirable rows / (undesirable_weight x undesirable rows) within [1, 4/3].")
    var desirableWeight = 1.0

    @Option(help: "KTO: the weight of the undesirable rows' losses (TRL's undesirable_weight).")
    var undesirableWeight = 1.0

    @Flag(help: "Print one JSON object with the results on stdout.")
    var json = false

    /// Every option of this run, resolved, in the YAML that --config reads (data and output included).
    var resolvedOptions: [(String, String)] {
        func q(_ s: String) -> String { JSON.serialize(.string(s)) }  // a JSON string is a valid YAML scalar
        var o: [(String, String)] = [
            ("model", q(modelOptions.modelPath)), ("quant_type", q(modelOptions.quantType)), ("block_size", "\(modelOptions.blockSize)"),
            ("no_double_quant", "\(modelOptions.noDoubleQuant)"), ("head_dtype", q(modelOptions.embeddingDType.rawValue)),
            ("bf16_embeddings", "\(modelOptions.bf16Embeddings)"),
        ]
        if let a = modelOptions.adapter { o.append(("adapter", q(a))) }
        o += [("data", q(data))]
        if let v = valData { o.append(("val_data", q(v))) }
        o += [
            ("val_split", "\(valSplit)"), ("format", q(format)), ("template", q(template)), ("output", q(output)),
            ("lora_r", "\(loraR)"), ("lora_alpha", "\(loraAlpha)"), ("lora_dropout", "\(loraDropout)"), ("target_modules", q(targetModules)),
            ("use_rslora", "\(useRslora)"), ("use_dora", "\(useDora)"), ("lora_init", q(loraInit)), ("loftq_iter", "\(loftqIter)"), ("learning_rate", "\(learningRate)"), ("lr_scheduler", q(lrScheduler)),
            ("warmup_steps", "\(warmupSteps)"), ("max_steps", "\(maxSteps)"), ("epochs", "\(epochs)"), ("batch_size", "\(batchSize)"),
            ("grad_accum", "\(gradAccum)"), ("max_grad_norm", "\(maxGradNorm)"), ("max_seq_len", "\(maxSeqLen)"),
        ]
        if let s = sourceMaxLen { o.append(("source_max_len", "\(s)")) }
        if let t = targetMaxLen { o.append(("target_max_len", "\(t)")) }
        if let r = loraplusLrRatio { o.append(("loraplus_lr_ratio", "\(r)")) }
        o += [
            ("optim", q(optim)), ("compute_dtype", q(computeDtype)), ("weight_decay", "\(weightDecay)"), ("seed", "\(seed)"), ("eval_every", "\(evalEvery)"),
            ("save_every", "\(saveEvery)"), ("save_total_limit", "\(saveTotalLimit)"), ("train_on_inputs", "\(trainOnInputs)"), ("packing", "\(packing)"),
            ("no_group_by_length", "\(noGroupByLength)"), ("skip_bad_records", "\(skipBadRecords)"), ("skip_nonfinite", "\(skipNonfinite)"),
            ("no_gradient_checkpointing", "\(noGradientCheckpointing)"), ("method", q(method)), ("beta", "\(beta)"), ("dpo_loss", q(dpoLoss)),
            ("kto_loss", q(ktoLoss)), ("desirable_weight", "\(desirableWeight)"), ("undesirable_weight", "\(undesirableWeight)"),
        ]
        return o
    }

    var resolvedOptionsYAML: String {
        "# qlora train options of this run (qlora \(QLoRAVersion.string)); reuse with --config\n"
            + resolvedOptions.map { "\($0.0): \($0.1)\n" }.joined()
    }

    func validate() throws {
        guard ComputeDType(rawValue: computeDtype) != nil else { throw ValidationError("--compute-dtype must be bf16 or f32") }
        guard OptimizerKind(rawValue: optim) != nil else { throw ValidationError("--optim must be one of \(OptimizerKind.allCases.map(\.rawValue).joined(separator: ", "))") }
        guard LRSchedule(rawValue: lrScheduler) != nil else { throw ValidationError("--lr-scheduler must be constant, cosine or linear") }
        guard DatasetFormat(rawValue: format) != nil else { throw ValidationError("--format must be one of \(DatasetFormat.allCases.map(\.rawValue).joined(separator: ", "))") }
        guard template == "chat" || template == "guanaco" else { throw ValidationError("--template must be chat or guanaco") }
        guard ["auto", "mpi", "none"].contains(distributed) else { throw ValidationError("--distributed must be auto, mpi or none") }
        guard loraR > 0, batchSize > 0, gradAccum > 0, maxSeqLen >= 8, epochs > 0 else { throw ValidationError("--lora-r, --batch-size, --grad-accum, --epochs must be positive and --max-seq-len at least 8") }
        guard loraDropout >= 0 && loraDropout < 1 else { throw ValidationError("--lora-dropout must be in [0, 1)") }
        guard valSplit >= 0 && valSplit < 1 else { throw ValidationError("--val-split must be in [0, 1)") }
        guard ["kaiming", "gaussian", "pissa", "loftq"].contains(loraInit) else { throw ValidationError("--lora-init must be kaiming, gaussian, pissa or loftq") }
        guard loftqIter >= 1 else { throw ValidationError("--loftq-iter must be at least 1") }
        if loftqIter != 1 && loraInit != "loftq" { throw ValidationError("--loftq-iter applies to --lora-init loftq") }
        if loraInit == "loftq" && quantTypeIsNone { throw ValidationError("--lora-init loftq starts from the error of a 4-bit base; --quant-type none has none") }
        if (loraInit == "pissa" || loraInit == "loftq") && (method == "dpo" || method == "kto") {
            // Their reference is the base with the adapter off, which after PiSSA or LoftQ is not the model they start from.
            throw ValidationError("--lora-init \(loraInit) with --method \(method): the reference of \(method) is the base with the adapter off, and after \(loraInit) that is not the model training starts from; start from kaiming or gaussian (or use --method orpo, which has no reference)")
        }
        if (loraInit == "pissa" || loraInit == "loftq") && modelOptions.adapter != nil {
            throw ValidationError("--lora-init \(loraInit) starts a new adapter from the base's weights; it cannot start from --adapter")
        }
        if let s = sourceMaxLen { guard s > 0 else { throw ValidationError("--source-max-len must be positive") } }
        if let t = targetMaxLen { guard t > 1 else { throw ValidationError("--target-max-len must be at least 2") } }
        if let r = loraplusLrRatio { guard r > 0 else { throw ValidationError("--loraplus-lr-ratio must be positive") } }
        switch method {
        case "sft": break
        case "dpo", "orpo", "kto":
            guard beta > 0 else { throw ValidationError("--beta must be positive") }
            if method == "kto" {
                guard KTOLoss(rawValue: ktoLoss) != nil else { throw ValidationError("--kto-loss must be one of \(KTOLoss.allCases.map(\.rawValue).joined(separator: ", "))") }
                guard desirableWeight > 0, undesirableWeight > 0 else { throw ValidationError("--desirable-weight and --undesirable-weight must be positive") }
                // The KL estimate pairs each row with another row of its block (as TRL, which refuses a batch of one).
                guard batchSize > 1 || ktoLoss == "apo_zero_unpaired" else { throw ValidationError("--method kto needs --batch-size of at least 2: each row's KL estimate takes the completion of another row of its batch") }
            } else {
                for (given, name) in [(ktoLoss != "kto", "--kto-loss"), (desirableWeight != 1, "--desirable-weight"), (undesirableWeight != 1, "--undesirable-weight")] where given {
                    throw ValidationError("\(name) applies to --method kto")
                }
            }
            if method == "dpo" {
                guard DPOLoss(rawValue: dpoLoss) != nil else { throw ValidationError("--dpo-loss must be one of \(DPOLoss.allCases.map(\.rawValue).joined(separator: ", "))") }
            } else {
                guard dpoLoss == "sigmoid" else { throw ValidationError("--dpo-loss applies to --method dpo") }
            }
            // Options of supervised finetuning that have no meaning for pairs: refused, not ignored.
            for (given, name) in [(packing, "--packing"), (trainOnInputs, "--train-on-inputs"), (template != "chat", "--template guanaco"),
                                  (format != "auto", "--format"), (sourceMaxLen != nil, "--source-max-len"), (targetMaxLen != nil, "--target-max-len")] where given {
                throw ValidationError("\(name) applies to --method sft; preference pairs are read as TRL reads them and rendered with the chat template")
            }
        default: throw ValidationError("--method must be sft, dpo, orpo or kto")
        }
    }

    var quantTypeIsNone: Bool { modelOptions.quantType == "none" }

    /// PiSSA or LoftQ: A and B from the full-precision weights, and the model with its new frozen bases. When the bases
    /// differ from the model's own quantization (PiSSA; LoftQ past one round), a new run (rank 0) writes them to
    /// OUTPUT/base (bitsandbytes 4-bit; f32 with --quant-type none), replacing what an earlier attempt left there, and
    /// the adapter names that folder as its base. A resumed run reads its bases back from there (A and B come from
    /// its checkpoint) instead of running the SVDs again.
    func startLowRank(_ method: LowRankInit.Method, model: LlamaModel, lora: LoRAWeights, resuming: Bool, write: Bool, json: Bool) throws -> (LlamaModel, String) {
        let folder = FileSystem.join(output, "base")
        let changesBase = method == .pissa || loftqIter > 1
        if resuming {
            // LoftQ's one round leaves the model's own quantization as the base.
            guard changesBase else { return (model, modelOptions.modelPath) }
            guard FileSystem.exists(FileSystem.join(folder, "config.json")) else {
                throw ValidationError("--resume with --lora-init \(method.rawValue): \(folder), the base the first run wrote, is missing")
            }
            do { return (try LowRankInit.restoreBases(from: folder, model: model, lora: lora), folder) } catch let e as TrainingError { throw ValidationError(e.description) }
        }
        let source: ModelMerger
        do { source = try LowRankInit.source(modelOptions.modelPath, method: method) } catch let e as TrainingError { throw ValidationError(e.description) }
        let quantization = QuantType(rawValue: modelOptions.quantType).map { (type: $0, blockSize: modelOptions.blockSize, doubleQuant: !modelOptions.noDoubleQuant) }
        let start = Clock.seconds()
        let bar = ProgressBar(method.rawValue, total: lora.slots.count, enabled: !json)
        let (updated, bases) = try LowRankInit.apply(method, iterations: loftqIter, model: model, lora: lora, source: source, quantization: quantization) { done, _ in
            bar.advance(by: 1, note: "\(done) projections")
            if Interrupt.requested { throw ValidationError("interrupted while computing the \(method.rawValue) initialisation; nothing was written") }
        }
        Log.info("\(method == .pissa ? "PiSSA" : "LoftQ (\(loftqIter) round\(loftqIter == 1 ? "" : "s"))"): A and B of \(lora.slots.count) projections from the SVD of their \(method == .pissa ? "weights" : "quantization error") in \(formatFixed(Clock.seconds() - start, 1)) s")
        guard changesBase else { return (updated, modelOptions.modelPath) }
        if write {
            // A new run: whatever an earlier attempt left in OUTPUT/base (other options, another model) is replaced.
            if FileSystem.exists(folder) { try FileSystem.removeTree(folder) }
            source.replacements = bases
            var export = ExportOptions()
            export.dtype = .f32
            export.showProgress = !json
            if let q = quantization {
                var options = QuantizeOptions()
                options.quantType = q.type
                options.blockSize = q.blockSize
                options.doubleQuant = q.doubleQuant
                _ = try ModelExport.writeRequantized(source, to: folder, options: export, quantization: options)
            } else {
                _ = try ModelExport.writeFolder(source, to: folder, options: export)
            }
            Log.info("the new base (the \(method == .pissa ? "residual" : "LoftQ-quantized") weights) written to \(folder): use it with --model \(folder) --adapter \(output)")
        }
        return (updated, folder)
    }

    func run() throws {
        // Ctrl-C or SIGTERM from here on ends the run cleanly (after saving, once training has begun).
        Interrupt.install(terminateToo: true)
        // Data parallelism over MPI: the ranks on this machine split its cores, rank 0 alone speaks and writes.
        var communicator: MPICommunicator?
        if distributed == "mpi" || (distributed == "auto" && MPICommunicator.launchedByMPI) {
            if Environment.get("QLORA_THREADS") == nil {
                let cores = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
                setenv("QLORA_THREADS", "\(max(1, cores / MPICommunicator.localSize))", 1)
            }
            communicator = try MPICommunicator()
        }
        let rank = communicator?.rank ?? 0
        Log.muted = rank != 0
        defer { communicator?.finalize() }
        if let communicator { Log.info("data parallel: \(communicator.size) ranks over MPI, \(Parallel.threadCount) threads each") }
        // The output folder: writable, and not silently reused (checked alike on every rank, prepared by rank 0).
        let latest: String?
        do {
            if rank == 0 {
                latest = try TrainingRun.prepare(output: output, resume: resume)
            } else {
                let existing = Trainer.checkpoints(in: output).last?.1
                if let existing, !resume { throw TrainingRunError.existingCheckpoints(output: output, latest: existing) }
                latest = existing
            }
        } catch let e as TrainingRunError { throw ValidationError(e.description) }

        let (loaded, tokenizer) = try modelOptions.load(progress: !json && rank == 0)
        var model = loaded
        let promptTemplate: PromptTemplate
        if template == "guanaco" {
            promptTemplate = .guanaco
        } else if let source = tokenizer.chatTemplate {
            promptTemplate = .chat(try ChatTemplate(source))
        } else {
            if method == "sft" { Log.info("note: the model has no chat template; using the Guanaco format (--template guanaco)") }
            promptTemplate = .guanaco
        }
        var encoded: [EncodedExample] = [], validation: [EncodedExample] = []
        var pairs: [EncodedPair] = [], validationPairs: [EncodedPair] = []
        if method != "sft" {
            // Plain-text pairs need no template; conversational ones are refused by name without one.
            let chatTemplate: ChatTemplate?
            if case let .chat(t) = promptTemplate { chatTemplate = t } else { chatTemplate = nil }
            func encodePairs(_ path: String) throws -> (pairs: [EncodedPair], records: Int, skipped: [DatasetError], dropped: Int) {
                let (records, skipped) = try PreferenceData.load(path, skipBadRecords: skipBadRecords)
                let encoded = try records.map { try PreferenceData.encode($0, tokenizer: tokenizer, template: chatTemplate, maxLength: maxSeqLen) }
                return (encoded.compactMap { $0 }, records.count, skipped, encoded.filter { $0 == nil }.count)
            }
            if method == "kto" {
                // Unpaired rows; the validation split is of records, so that each set pairs its own rows for the KL term.
                let (records, skipped) = try PreferenceData.loadUnpaired(data, skipBadRecords: skipBadRecords)
                var train = records, held: [UnpairedRecord] = []
                if let valData {
                    held = try PreferenceData.loadUnpaired(valData, skipBadRecords: skipBadRecords).records
                } else if valSplit > 0 && records.count >= 20 {
                    (train, held) = EncodedExample.splitValidation(records, fraction: valSplit, seed: seed)
                }
                let encodedTrain = try PreferenceData.encodeUnpaired(train, tokenizer: tokenizer, template: chatTemplate, maxLength: maxSeqLen, blockSize: batchSize)
                let encodedHeld = try PreferenceData.encodeUnpaired(held, tokenizer: tokenizer, template: chatTemplate, maxLength: maxSeqLen, blockSize: batchSize)
                pairs = encodedTrain.rows
                validationPairs = encodedHeld.rows
                let desirable = pairs.filter { $0.desirable == true }.count, undesirable = pairs.count - desirable
                let truncated = (pairs + validationPairs).filter { $0.chosen.truncated }.count
                Log.info("data: \(records.count) KTO rows (\(desirable) desirable, \(undesirable) undesirable in training), \(pairs.count) train / \(validationPairs.count) validation, \(skipped.count) skipped, \(truncated) truncated to \(maxSeqLen) tokens, \(encodedTrain.dropped + encodedHeld.dropped) dropped (a prompt of \(maxSeqLen) tokens or more)")
                for s in skipped.prefix(5) { Log.info("  skipped \(s)") }
                // The KTO paper's advice, which TRL checks too: the weighted desirable and undesirable totals within 1 to 4/3.
                if desirable > 0 && undesirable > 0 {
                    let ratio = desirableWeight * Double(desirable) / (undesirableWeight * Double(undesirable))
                    if ratio < 1 || ratio > 4.0 / 3.0 {
                        Log.info("note: desirable_weight x desirable rows / (undesirable_weight x undesirable rows) is \(formatFixed(ratio, 2)); the KTO paper recommends 1 to 1.33 (set --desirable-weight or --undesirable-weight)")
                    }
                }
            } else {
            let loaded = try encodePairs(data)
            pairs = loaded.pairs
            if let valData {
                validationPairs = try encodePairs(valData).pairs
            } else if valSplit > 0 && pairs.count >= 20 {
                (pairs, validationPairs) = EncodedExample.splitValidation(pairs, fraction: valSplit, seed: seed)
            }
            let truncated = (pairs + validationPairs).filter { $0.chosen.truncated || $0.rejected.truncated }.count
            Log.info("data: \(loaded.records) preference pairs, \(pairs.count) train / \(validationPairs.count) validation, \(loaded.skipped.count) skipped, \(truncated) truncated to \(maxSeqLen) tokens, \(loaded.dropped) dropped (a completion cut away entirely)")
            for s in loaded.skipped.prefix(5) { Log.info("  skipped \(s)") }
            }
        } else {
        let encoder = try ExampleEncoder(tokenizer: tokenizer, template: promptTemplate, maxLength: maxSeqLen, trainOnInputs: trainOnInputs,
                                         sourceMaxLength: sourceMaxLen, targetMaxLength: targetMaxLen)
        let prepared = try TrainingData(path: data, format: DatasetFormat(rawValue: format)!, skipBadRecords: skipBadRecords, encoder: encoder,
                                        validationPath: valData, validationFraction: valSplit, seed: seed)
        let dataset = prepared.dataset, dropped = prepared.dropped
        validation = prepared.validation
        encoded = prepared.train
        let truncated = encoded.filter(\.truncated).count + validation.filter(\.truncated).count
        Log.info("data: \(dataset.examples.count) examples (\(dataset.format.rawValue)), \(encoded.count) train / \(validation.count) validation, \(dataset.skipped.count) skipped, \(truncated) truncated to \(maxSeqLen) tokens, \(dropped) dropped (no response token within \(maxSeqLen)), \(encoded.reduce(0) { $0 + $1.trainedTokens }) trained tokens")
        for s in dataset.skipped.prefix(5) { Log.info("  skipped \(s)") }
        if packing {
            let before = encoded.count
            encoded = Packing.pack(encoded, capacity: maxSeqLen)
            Log.info("packing: \(before) examples in \(encoded.count) sequences of up to \(maxSeqLen) tokens")
        }
        }

        var loraConfig = LoRAConfig()
        loraConfig.rank = loraR
        loraConfig.alpha = loraAlpha
        loraConfig.dropout = loraDropout
        loraConfig.useRSLoRA = useRslora
        loraConfig.useDoRA = useDora
        loraConfig.initialization = loraInit == "gaussian" ? .gaussian : .kaiming  // pissa and loftq set A and B below
        loraConfig.seed = seed
        let present = Projection.present(fused: model.config.fusedProjections)
        if targetModules != "all" {
            // The model's own module names (Phi-3 fuses qkv_proj and gate_up_proj, as PEFT names them).
            let names = present.map(\.name).joined(separator: ", ")
            loraConfig.targets = try targetModules.split(separator: ",").map {
                guard let p = Projection(name: String($0)), present.contains(p) else {
                    throw ValidationError("target module '\($0)' is not a linear layer of this \(model.config.family.huggingFaceArchitecture) model (it has \(names))")
                }
                return p
            }
        } else {
            loraConfig.targets = present
        }
        let lora = LoRAWeights(model: model, config: loraConfig)
        var baseModel = modelOptions.modelPath
        if let method = LowRankInit.Method(rawValue: loraInit) {
            (model, baseModel) = try startLowRank(method, model: model, lora: lora, resuming: latest != nil, write: rank == 0, json: json || rank != 0)
        }
        var trainingOptions = TrainingOptions()
        trainingOptions.gradientCheckpointing = !noGradientCheckpointing
        trainingOptions.computeDType = ComputeDType(rawValue: computeDtype)!
        let engine = TrainingEngine(model: model, lora: lora, options: trainingOptions)
        var config = TrainerConfig()
        config.learningRate = learningRate
        config.schedule = LRSchedule(rawValue: lrScheduler)!
        config.warmupSteps = warmupSteps
        config.batchSize = batchSize
        config.gradientAccumulation = gradAccum
        config.maxGradNorm = maxGradNorm
        config.epochs = epochs
        config.maxSteps = maxSteps
        config.seed = seed
        config.evalEvery = evalEvery
        config.saveEvery = saveEvery
        config.saveTotalLimit = saveTotalLimit
        config.groupByLength = !noGroupByLength
        config.skipNonFinite = skipNonfinite
        config.optimizer = OptimizerKind(rawValue: optim)!
        config.adam.weightDecay = weightDecay
        config.loraPlusRatio = loraplusLrRatio
        let padToken = tokenizer.eosTokenID ?? 0
        let trainer: Trainer
        if method == "dpo" {
            var dpo = DPOConfig()
            dpo.beta = beta
            dpo.loss = DPOLoss(rawValue: dpoLoss)!
            trainer = try Trainer(engine: engine, config: config, pairs: pairs, validationPairs: validationPairs, dpo: dpo, padToken: padToken)
        } else if method == "orpo" {
            var orpo = ORPOConfig()
            orpo.beta = beta
            trainer = try Trainer(engine: engine, config: config, pairs: pairs, validationPairs: validationPairs, objective: .orpo(orpo), padToken: padToken)
        } else if method == "kto" {
            var kto = KTOConfig()
            kto.beta = beta
            kto.loss = KTOLoss(rawValue: ktoLoss)!
            kto.desirableWeight = desirableWeight
            kto.undesirableWeight = undesirableWeight
            trainer = try Trainer(engine: engine, config: config, pairs: pairs, validationPairs: validationPairs, objective: .kto(kto), padToken: padToken)
        } else {
            trainer = try Trainer(engine: engine, config: config, train: encoded, validation: validation, padToken: padToken)
        }
        trainer.communicator = communicator
        let run = TrainingRun(trainer: trainer, output: output, baseModel: baseModel, arguments: Array(resolvedOptionsYAML.utf8))
        run.writesFiles = rank == 0
        if rank == 0 { do { try run.checkSpace() } catch let e as TrainingRunError { throw ValidationError(e.description) } }
        run.shouldStop = { Interrupt.requested }
        Log.info("training \(lora.parameterCount) LoRA parameters (r \(loraR), \(loraConfig.targets.count) projections (\(loraConfig.targets.map(\.name).joined(separator: ", "))) x \(model.config.layerCount) layers)\(method == "dpo" ? " with DPO (\(dpoLoss), beta \(beta))" : method == "orpo" ? " with ORPO (beta \(beta))" : method == "kto" ? " with KTO (\(ktoLoss), beta \(beta), weights \(desirableWeight) / \(undesirableWeight))" : "")\(useDora ? ", DoRA" : ""), \(trainer.totalSteps) steps of \(batchSize) x \(gradAccum) \(method == "sft" ? "sequences" : method == "kto" ? "rows" : "pairs"), \(optim), lr \(learningRate)\(loraplusLrRatio.map { " (B: x\($0), LoRA+)" } ?? "") \(lrScheduler), \(engine.usesBF16 ? "bf16" : "f32") compute")
        if trainingOptions.computeDType == .bf16 && !engine.usesBF16 {
            Log.info("note: this CPU has no AVX512-BF16; computing in f32")
        }
        var progress: ProgressBar?
        var referenceBar: ProgressBar?, referenceDone = 0
        let result = try run.run(resumingFrom: latest) { event in
            switch event {
            case let .resumed(checkpoint, step): Log.info("resumed from \(checkpoint) at step \(step)")
            case let .validationBefore(v): Log.info("validation loss before training: \(formatFixed(v, 4))")
            case let .started(step, total):
                progress = ProgressBar("train", total: total, enabled: !json && rank == 0)
                if step > 0 { progress?.advance(by: step) }
            case let .step(m):
                progress?.advance(note: "loss \(formatFixed(m.loss, 4))" + (m.preference.map { " margin \(formatFixed($0.margins, 3)) " + ($0.unpaired ? "kl \(formatFixed($0.kl, 3))" : "acc \(formatFixed($0.accuracy, 2))") } ?? "")
                                  + " lr \(m.learningRate) \(formatFixed(m.tokensPerSecond, 0)) tok/s" + (m.validationLoss.map { " val \(formatFixed($0, 4))" } ?? ""))
            case .checkpoint: break
            case let .reference(done, total, cached):
                if cached {
                    Log.info("reference log-probabilities of \(total) \(method == "kto" ? "rows" : "pairs") read from \(output)/reference_logps.json")
                } else {
                    if referenceBar == nil { referenceBar = ProgressBar("reference", total: total, enabled: !json && rank == 0) }
                    referenceBar?.advance(by: done - referenceDone)
                    referenceDone = done
                }
            }
        }
        if result.stopped {
            Log.info(result.checkpoint.map { "\ninterrupted: saved \($0); continue with --resume" } ?? "interrupted before training began; nothing to save")
            return
        }
        guard rank == 0 else { return }
        if json {
            var fields: [(String, JSONValue)] = [("output", .string(output)), ("steps", .int(result.steps)),
                                                 ("trainable_parameters", .int(lora.parameterCount))]
            if let v = result.finalLoss { fields.append(("final_loss", .double(v))) }
            if let v = result.validationBefore { fields.append(("val_loss_before", .double(v))) }
            if let v = result.validationAfter { fields.append(("val_loss_after", .double(v))) }
            printJSON(.object(fields))
        } else {
            print("Wrote the adapter to \(output) (\(result.steps) steps)" + (result.validationAfter.map { ", validation loss \(result.validationBefore.map { formatFixed($0, 4) + " -> " } ?? "")\(formatFixed($0, 4))" } ?? ""))
        }
    }
}
