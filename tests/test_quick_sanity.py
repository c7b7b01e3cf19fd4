from raypipe.predict import Predictor


def test_checkpoint_roundtrip_predicts_same_logits(tiny_checkpoint, tiny_model_dir):
    import torch

    from raypipe.model import load_checkpoint

    model, tok, meta = load_checkpoint(tiny_checkpoint)
    p = Predictor.from_dir(tiny_checkpoint, device="cpu")
    texts = ["goal match team", "software chip"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = torch.softmax(model(**enc).logits, -1).numpy()
    got = p.predict_proba(texts)
    assert abs(ref - got).max() < 1e-5
    assert meta["labels"] == ["food", "sport", "tech"]
