"""peft, accelerate, diffusers and sentence-transformers load through tensorlift unchanged: what each writes with
its own save functions loads after ``tensorlift.patch()`` to the same tensors, bit for bit,
as stock, and tensorlift is seen opening the files."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The test command installs them (TENSORLIFT_REQUIRE_DEPS): there, a missing one fails.
if os.environ.get("CI") or os.environ.get("TENSORLIFT_REQUIRE_DEPS"):
    import accelerate
    import diffusers
    import peft
    import sentence_transformers
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    accelerate = pytest.importorskip("accelerate")
    diffusers = pytest.importorskip("diffusers")
    sentence_transformers = pytest.importorskip("sentence_transformers")

import tensorlift


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        raw = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a[k], b[k])]
        assert torch.equal(*raw), k  # bit for bit


def test_peft_adapter(tmp_path, served):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    stock = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert served["opened"] == 0
    with tensorlift.patch():
        ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert served["opened"] >= 1, served
    same_tensors(ours.state_dict(), stock.state_dict())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_accelerate_load_checkpoint_in_model(tmp_path, served):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    stock, ours = tiny_llama(), tiny_llama()
    for p in list(stock.parameters()) + list(ours.parameters()):
        p.data.zero_()
    accelerate.load_checkpoint_in_model(stock, str(tmp_path))
    with tensorlift.patch():
        accelerate.load_checkpoint_in_model(ours, str(tmp_path))
    assert served["opened"] >= 2, served
    same_tensors(ours.state_dict(), stock.state_dict())


def test_diffusers_from_pretrained(tmp_path, served):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    unet.save_pretrained(tmp_path)
    stock = diffusers.UNet2DModel.from_pretrained(tmp_path)
    with tensorlift.patch():
        ours = diffusers.UNet2DModel.from_pretrained(tmp_path)
    assert served["opened"] >= 1, served
    same_tensors(ours.state_dict(), stock.state_dict())


def test_sentence_transformers(tmp_path, served):
    # A BERT-shaped encoder written by transformers, with a word-piece vocabulary of its own,
    # then pooling and a Dense layer (which sentence-transformers saves and loads itself,
    # through safetensors.torch.load_model).
    from sentence_transformers.sentence_transformer import modules

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    encoder = modules.Transformer(str(tmp_path / "bert"))
    model = sentence_transformers.SentenceTransformer(
        modules=[encoder, modules.Pooling(32, "mean"), modules.Dense(32, 16)], device="cpu"
    )
    model.save(str(tmp_path / "st"))
    assert os.path.exists(tmp_path / "st" / "model.safetensors")
    dense = [d for d in os.listdir(tmp_path / "st") if d.endswith("_Dense")]
    assert dense and os.path.exists(tmp_path / "st" / dense[0] / "model.safetensors")

    sentences = ["w1 w2 w3", "w40 w41", "w7"]
    stock = sentence_transformers.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert served["opened"] == 0
    with tensorlift.patch():
        ours = sentence_transformers.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    # The encoder's file and the Dense layer's, both through tensorlift.
    assert served["opened"] == 2, served
    same_tensors(ours.state_dict(), stock.state_dict())
    a = ours.encode(sentences, convert_to_tensor=True)
    b = stock.encode(sentences, convert_to_tensor=True)
    assert a.shape == (3, 16) and torch.equal(a, b)
