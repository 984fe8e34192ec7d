"""Helpers for the corpus tests: write small WARC files with hand-made Japanese / English pages."""

from __future__ import annotations

import gzip
import uuid
from pathlib import Path

ARTICLES = {
    "tea": [
        "静岡県の山あいにある小さな茶畑では、毎年五月になると新茶の摘み取りが始まります。",
        "朝早くから家族総出で畑に出て、やわらかい若葉だけを丁寧に手で摘んでいきます。",
        "摘んだ葉はその日のうちに蒸して揉み、乾燥させることで香りの高いお茶に仕上がります。",
        "最近では機械で収穫する農家も増えましたが、この畑では昔ながらの方法を守っています。",
        "祖父の代から続くやり方を変えないのは、手摘みの茶葉にしか出せない甘みがあるからだそうです。",
        "畑の持ち主である田中さんは、若い人にもお茶づくりの面白さを知ってほしいと話していました。",
        "週末には近くの小学校の子どもたちが見学に訪れ、茶摘みの体験を楽しんでいます。",
        "子どもたちは最初は慣れない手つきでしたが、しばらくすると上手に葉を選べるようになりました。",
        "体験のあとには、自分たちで摘んだ葉から作ったお茶を味わう時間も用意されています。",
        "一口飲んだ子どもが驚いた顔で甘いと言うと、周りの大人たちからも笑い声が上がりました。",
        "田中さんによると、今年は春先の気温が安定していたため、例年よりも品質が良いとのことです。",
        "ただし人手不足は深刻で、収穫の時期には遠くに住む親戚にも手伝いを頼んでいるといいます。",
        "地域では空き家を活用して、農業に興味を持つ若者を受け入れる取り組みも始まりました。",
        "この春から移り住んだ二人の若者は、来年には自分たちの畑を持ちたいと意気込んでいます。",
    ],
    "library": [
        "駅前にある市立図書館が改装を終え、先週の土曜日から新しい姿で利用できるようになりました。",
        "館内は以前よりも窓が大きくなり、天気の良い日には自然の光がたっぷりと差し込みます。",
        "一階には子ども向けの本を集めた広い部屋が作られ、靴を脱いで床に座って読むこともできます。",
        "二階の学習室は予約制に変わり、インターネットから空いている席を確かめられるようになりました。",
        "改装にあわせて、地元の歴史に関する古い資料をまとめて展示するコーナーも新しく設けられました。",
        "展示されている地図や写真からは、百年ほど前の町の様子がよくわかると評判になっています。",
        "館長の山本さんは、本を借りるだけでなく人が集まる場所にしたいと考えているそうです。",
        "そのため毎月第二日曜日には、読み聞かせの会や本の交換会などの催しを開く予定です。",
        "初日に訪れた近所の女性は、明るくて居心地が良いので毎週通いたいとうれしそうに話していました。",
        "一方で、駐車場が少ないことを心配する声もあり、市は近くの空き地を借りることを検討しています。",
        "開館時間も見直され、平日は夜八時まで開いているので仕事帰りにも立ち寄りやすくなりました。",
        "図書館の入り口には小さな喫茶スペースもあり、買った飲み物を飲みながら雑誌を読めます。",
        "市の担当者は、利用者の意見を聞きながら今後もサービスを少しずつ改善していくと述べました。",
    ],
    "bread": [
        "商店街の角にある小さなパン屋は、開店してから今年でちょうど三十年を迎えました。",
        "店主の佐藤さんは毎朝三時に起きて生地をこね、六時の開店に間に合うように焼き上げています。",
        "人気の食パンは昼前には売り切れてしまうことが多く、予約をしてから来るお客さんもいます。",
        "材料にはできるだけ近くの農家で育てられた小麦を使い、季節ごとに配合を少しずつ変えています。",
        "夏は湿気が多いので水の量を減らし、冬は発酵に時間がかかるので早めに仕込みを始めるそうです。",
        "店の奥にある古い窯は、開店のときに先代から譲り受けたもので、今も大切に使われています。",
        "最近は娘さんも店に立つようになり、新しい菓子パンを考えるのが楽しみだと話していました。",
        "娘さんが考えたかぼちゃのパンは、子どもたちの間で評判になり、すぐに定番の商品になりました。",
        "常連のお客さんの中には、学生のころから三十年近く通い続けている人も少なくありません。",
        "佐藤さんは、体が動く限りはこの場所でパンを焼き続けたいと笑顔で話してくれました。",
        "記念日には感謝の気持ちを込めて、来店した人に小さな焼き菓子を配る予定だということです。",
        "商店街の人たちも、長く続く店があることは町にとって大きな励みになると喜んでいます。",
        "これからも朝の商店街には、焼きたてのパンの香りが広がり続けることでしょう。",
    ],
}

ENGLISH = ("The city library reopened last Saturday after a year of renovation work. " * 3 +
           "Visitors praised the bright reading rooms and the new children's corner. " * 3)


def article_html(key: str, title: str | None = None, lang: str = "ja") -> str:
    paragraphs = "\n".join(f"<p>{s}</p>" for s in ARTICLES[key])
    return (f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{title or key}のお知らせ</title>'
            f'</head><body><nav><a href="/">トップ</a> <a href="/news">ニュース</a></nav><article><h1>'
            f'{title or key}</h1>{paragraphs}</article><footer>Copyright 2024 All rights reserved</footer>'
            f"</body></html>")


def boilerplate_html() -> str:
    links = "".join(f'<li><a href="/p{i}">カテゴリ{i}</a></li>' for i in range(30))
    return (f'<html lang="ja"><head><title>サイトマップ</title></head><body><ul>{links}</ul>'
            f"<p>ログイン</p></body></html>")


def spam_html() -> str:
    line = "激安セール開催中！今すぐクリックしてお得な商品をチェックしてください！"
    body = "".join(f"<p>{line}</p>" for _ in range(40))
    return f'<html lang="ja"><head><title>激安セール</title></head><body><article>{body}</article></body></html>'


def english_html() -> str:
    return (f'<html lang="en"><head><title>City library reopens</title></head><body><article>'
            f"<h1>City library reopens</h1><p>{ENGLISH}</p><p>{ENGLISH}</p></article></body></html>")


def http_response(body: bytes, content_type: str = "text/html; charset=utf-8", status: int = 200,
                  eol: bytes = b"\r\n", extra_headers: tuple = ()) -> bytes:
    reason = {200: b"OK", 404: b"Not Found"}.get(status, b"X")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"Content-Type: " + content_type.encode(),
             b"Content-Length: %d" % len(body), *extra_headers]
    return eol.join(lines) + eol + eol + body


def warc_record(block: bytes, url: str, rec_type: str = "response", date: str = "2024-03-01T12:00:00Z",
                record_id: str | None = None) -> bytes:
    rid = record_id or f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url + rec_type)}>"
    content_type = "application/http; msgtype=response" if rec_type == "response" else "application/warc-fields"
    head = (f"WARC/1.1\r\nWARC-Type: {rec_type}\r\nWARC-Record-ID: {rid}\r\nWARC-Date: {date}\r\n"
            + (f"WARC-Target-URI: {url}\r\n" if url else "")
            + f"Content-Type: {content_type}\r\nContent-Length: {len(block)}\r\n\r\n").encode()
    return head + block + b"\r\n\r\n"


def write_warc(path: Path, pages: list[tuple[str, bytes]], snapshot: str | None = "CC-MAIN-2024-10",
               gz: bool = True) -> Path:
    """pages: (url, http block) pairs; a warcinfo record first (isPartOf: snapshot) unless snapshot is None."""
    records = []
    if snapshot:
        records.append(warc_record(f"isPartOf: {snapshot}\r\nsoftware: hibari-test\r\n".encode(), "", "warcinfo"))
    records += [warc_record(block, url) for url, block in pages]
    data = b"".join(gzip.compress(r) for r in records) if gz else b"".join(records)
    path.write_bytes(data)
    return path
