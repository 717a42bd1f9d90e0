"""Sequence layout: Lumina-mGPT's conversation format, image parts of any size, labels, round trips."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from arra_ds.tokens.conversation import (
    ConversationError,
    ConversationTokenizer,
    load_text_tokenizer,
    text_to_image_sample,
)
from arra_ds.tokens.layout import IGNORE_INDEX, IMAGE_PLACEHOLDER, image_part_length, image_to_tokens, labels_for
from arra_ds.tokens.vocab import (
    BOS,
    END_OF_TURN,
    EOS,
    GRID_TOKEN_BASE,
    IMAGE_END,
    IMAGE_START,
    PAD,
    ROW_END,
    ChameleonVocab,
    build_debug_tokenizer,
    grid_token_name,
    image_code_token_name,
    tokens_to_image,
)

NUM_CODES = 64
PROMPTS = [
    "AP view chest x-ray image, No acute cardiopulmonary process.  No evidence of free air.",
    " leading space and trailing space ",
    "line one\nline two: 42%",
    "a red circle at the top left",
]


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE with Chameleon's special and image-code token names, saved as text_tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(PROMPTS * 10 + ["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tok.add_special_tokens([IMAGE_START, IMAGE_END, END_OF_TURN, ROW_END])
    tok.add_special_tokens([grid_token_name(n) for n in range(1, 65)])
    tok.add_tokens([image_code_token_name(c) for c in range(NUM_CODES)])
    path = tmp_path_factory.mktemp("tok") / "text_tokenizer.json"
    tok.save(str(path))
    return load_text_tokenizer(path)


@pytest.fixture(scope="module")
def bpe_vocab(bpe_tokenizer) -> ChameleonVocab:
    return ChameleonVocab(bpe_tokenizer.get_vocab(with_added_tokens=True), source="test bpe")


def lumina_reference(tokenizer: Tokenizer, vocab: ChameleonVocab, turns, images):
    """Lumina-mGPT's MMConvItemProcessor.process_item + FlexAR flattening, on a HF fast tokenizer."""
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.to_str()))
    hf.add_tokens([IMAGE_PLACEHOLDER])
    placeholder = hf.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    pieces = [(text + END_OF_TURN, i % 2 == 1) for i, (_, text) in enumerate(turns)]
    conversation = "".join(p for p, _ in pieces)
    tokens = [vocab.bos_id] + hf.encode(conversation, add_special_tokens=False)
    labels = [IGNORE_INDEX] * len(tokens)
    pos = 0
    for i, (piece, predict) in enumerate(pieces):
        ids = ([vocab.bos_id] if i == 0 else []) + hf.encode(piece, add_special_tokens=False)
        assert tokens[pos : pos + len(ids)] == ids  # Lumina's piece/full consistency assertion
        if predict:
            labels[pos : pos + len(ids)] = ids
        pos += len(ids)
    flat_tokens, flat_labels, images = [], [], iter(images)
    for t, label in zip(tokens, labels):
        if t == placeholder:
            image = next(images)
            flat_tokens += image
            flat_labels += image if label > 0 else [IGNORE_INDEX] * len(image)
        else:
            flat_tokens.append(t)
            flat_labels.append(label)
    return flat_tokens, flat_labels


def random_codes(h, w, seed=0):
    return torch.randint(0, NUM_CODES, (h, w), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_to_image_layout_matches_lumina(prompt, bpe_tokenizer, bpe_vocab):
    conv = ConversationTokenizer(bpe_tokenizer, bpe_vocab)
    image = image_to_tokens(random_codes(4, 6), bpe_vocab)
    tokens, prompt_len = text_to_image_sample(prompt, image, conv)
    ref_tokens, ref_labels = lumina_reference(bpe_tokenizer, bpe_vocab, [("human", prompt), ("gpt", IMAGE_PLACEHOLDER)], [image])
    assert tokens == ref_tokens
    assert labels_for(tokens, prompt_len) == ref_labels
    # <s> prompt <eot> | image <eot>; the prompt text is tokenised as is (no added prefix space)
    prompt_ids = bpe_tokenizer.encode(prompt, add_special_tokens=False).ids
    assert tokens == [bpe_vocab.bos_id, *prompt_ids, bpe_vocab.end_of_turn_id, *image, bpe_vocab.end_of_turn_id]
    assert prompt_len == len(prompt_ids) + 2


def test_general_conversation_matches_lumina(bpe_tokenizer, bpe_vocab):
    """Text around the image in the answer, and a second turn pair: labels follow the turns."""
    conv = ConversationTokenizer(bpe_tokenizer, bpe_vocab)
    turns = [("human", "draw a fox"), ("gpt", f"Here: {IMAGE_PLACEHOLDER} done."), ("human", "again"), ("gpt", IMAGE_PLACEHOLDER)]
    images = [image_to_tokens(random_codes(2, 2, s), bpe_vocab) for s in (1, 2)]
    tokenized = conv.tokenize(turns)
    assert tokenized.num_images == 2
    assert tokenized.with_images(images) == lumina_reference(bpe_tokenizer, bpe_vocab, turns, images)
    with pytest.raises(ConversationError, match="2 <\\|image\\|> placeholders but 1 images"):
        tokenized.with_images(images[:1])
    with pytest.raises(ConversationError, match="alternate"):
        conv.tokenize([("gpt", "x")])


@pytest.mark.parametrize("h, w", [(32, 32), (2, 2), (4, 6), (48, 20), (16, 64)])
def test_image_part_sizes_and_round_trip(h, w, bpe_vocab):
    codes = random_codes(h, w, seed=h * 100 + w)
    part = image_to_tokens(codes, bpe_vocab)
    assert len(part) == image_part_length(h, w) == 3 + h * (w + 1) + 1
    assert part[0] == bpe_vocab.image_start_id and part[-1] == bpe_vocab.image_end_id
    assert bpe_vocab.grid_count(part[1]) == h // 2 and bpe_vocab.grid_count(part[2]) == w // 2
    rows = torch.tensor(part[3:-1]).view(h, w + 1)
    assert (rows[:, -1] == bpe_vocab.row_end_id).all()
    assert torch.equal(tokens_to_image(part, bpe_vocab), codes)
    assert image_to_tokens(tokens_to_image(part, bpe_vocab), bpe_vocab) == part


def test_512px_image_is_1060_tokens(bpe_vocab):
    assert len(image_to_tokens(random_codes(32, 32), bpe_vocab)) == 1060
    assert bpe_vocab.id(grid_token_name(16)) == bpe_vocab.grid_token_id(16)
    assert grid_token_name(16) == f"<reserved{GRID_TOKEN_BASE + 16:05d}>"


def test_labels_mask_exactly_the_prompt(bpe_tokenizer, bpe_vocab):
    conv = ConversationTokenizer(bpe_tokenizer, bpe_vocab)
    tokens, prompt_len = text_to_image_sample("two blue squares", image_to_tokens(random_codes(2, 4), bpe_vocab), conv)
    labels = labels_for(tokens, prompt_len)
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == tokens[prompt_len:]
    assert tokens[prompt_len] == bpe_vocab.image_start_id and tokens[prompt_len - 1] == bpe_vocab.end_of_turn_id


def test_debug_word_tokenizer_works_too():
    tokenizer = build_debug_tokenizer(num_image_codes=NUM_CODES)
    vocab = ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True))
    conv = ConversationTokenizer(tokenizer, vocab)
    tokens, prompt_len = text_to_image_sample("a red circle at the top left", image_to_tokens(random_codes(2, 2), vocab), conv)
    words = [vocab.id_to_token[t] for t in tokens[1 : prompt_len - 1]]
    assert words == ["a", "red", "circle", "at", "the", "top", "left"]
    with pytest.raises(ConversationError, match="text only"):
        text_to_image_sample(f"a {IMAGE_PLACEHOLDER} b", [], conv)


def test_tokenizer_without_special_end_of_turn_is_rejected(bpe_vocab):
    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConversationError, match="added \\(special\\) token"):
        ConversationTokenizer(tok, bpe_vocab)


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_tokenizer.json"):
        load_text_tokenizer(tmp_path / "nope.json")
