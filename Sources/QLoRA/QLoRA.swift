// swift-qlora: QLoRA finetuning of Llama-family models. Import this module to get the whole library (the
// judge's HTTP client, QLoRAOpenAI, is a module of its own, so that a program that trains does not link NIO).
@_exported import QLoRACore
@_exported import QLoRAFormats
@_exported import QLoRAKernels
@_exported import QLoRAModel
@_exported import QLoRATokenizer
@_exported import QLoRAGeneration
@_exported import QLoRAEvaluation
@_exported import QLoRATraining
@_exported import QLoRAExport
