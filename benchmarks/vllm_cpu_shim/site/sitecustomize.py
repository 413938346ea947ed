# SHIM for the vLLM CPU benchmark baseline only -- not part of ministral-serve.
# Put this directory on PYTHONPATH for the baseline vLLM server process only,
# so vLLM's Mistral3 multimodal path works on CPU without torchvision (no CPU
# wheel for torch 2.13.0+cpu on PyPI):
#  1. `transformers.models.pixtral.image_processing_pixtral` (imports
#     torchvision) is served by the PIL-only `image_processing_pil_pixtral`,
#     with `PixtralImageProcessor` aliased to `PixtralImageProcessorPil`.
#  2. `PixtralProcessor` (declared as needing torchvision only because of that
#     import) is un-marked as missing a backend in transformers' lazy module.
#  3. With `--tokenizer-mode mistral`, vLLM's profiling prompt for Mistral3 is
#     the text "[IMG]", which mistral_common encodes as plain text, not as the
#     image token; the dummy prompt is replaced by [BOS] + [IMG] * n_images.
#     mistral_common's chat template already expands each image to its full
#     [IMG]..[IMG_BREAK]..[IMG_END] block, while vLLM's Mistral3 processor
#     always expands one [IMG] per image itself (which would duplicate the
#     block); each pre-expanded block is collapsed back to a single [IMG].
import importlib
import importlib.abc
import importlib.util
import sys

_PIXTRAL_IP = "transformers.models.pixtral.image_processing_pixtral"


class _PilPixtralLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
        module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        module.PixtralImageProcessor = pil.PixtralImageProcessorPil
        module.__all__ = ["PixtralImageProcessor"]


def _patch_pixtral_package(module):
    missing = getattr(module, "_object_missing_backend", {})
    for name in ("PixtralProcessor", "processing_pixtral"):
        missing.pop(name, None)


def _patch_vllm_mistral3(module):
    from vllm.utils.mistral import is_mistral_tokenizer

    cls = module.Mistral3MultiModalProcessor
    orig = cls.get_dummy_inputs

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        inputs = orig(self, seq_len, mm_counts, mm_options)
        tok = self.info.ctx.tokenizer
        if is_mistral_tokenizer(tok):
            image_id = self.info.get_hf_config().image_token_index
            inputs.prompt = [tok.bos_token_id] + [image_id] * mm_counts.get("image", 0)
        return inputs

    cls.get_dummy_inputs = get_dummy_inputs

    orig_apply = cls.apply

    def apply(self, inputs, *args, **kwargs):
        if is_mistral_tokenizer(self.info.ctx.tokenizer):
            vocab = self.info.get_tokenizer().get_vocab()
            proc = self.info.get_hf_processor()
            img = self.info.get_hf_config().image_token_index
            brk, end = vocab[proc.image_break_token], vocab[proc.image_end_token]
            out, in_block = [], False
            for t in inputs.prompt:
                if in_block:
                    in_block = t != end
                    if t in (img, brk, end):
                        continue
                if t == img:
                    out.append(img)
                    in_block = True
                else:
                    out.append(t)
            inputs.prompt = out
        return orig_apply(self, inputs, *args, **kwargs)

    cls.apply = apply


_POST_IMPORT = {
    "transformers.models.pixtral": _patch_pixtral_package,
    "vllm.model_executor.models.mistral3": _patch_vllm_mistral3,
}


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader, hook):
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook(sys.modules[module.__name__])  # transformers swaps in a _LazyModule


class _ShimFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == _PIXTRAL_IP:
            return importlib.util.spec_from_loader(fullname, _PilPixtralLoader())
        hook = _POST_IMPORT.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _PostImportLoader(spec.loader, hook)
                return spec
        return None


sys.meta_path.insert(0, _ShimFinder())
