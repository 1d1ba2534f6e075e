// swift-qlora: QLoRA finetuning of Llama-family models. Import this module to get the whole library.
@_exported import QLoRACore
@_exported import QLoRAFormats
@_exported import QLoRAKernels
@_exported import QLoRAModel
@_exported import QLoRATokenizer
@_exported import QLoRAGeneration
@_exported import QLoRAEvaluation
@_exported import QLoRATraining
@_exported import QLoRAOpenAI
@_exported import QLoRAExport
